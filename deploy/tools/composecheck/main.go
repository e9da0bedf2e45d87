// compose-check loads a Compose file the way `docker compose config` does (compose-go:
// schema validation against the Compose Specification, interpolation, normalisation,
// consistency checks such as unknown networks, volumes or depends_on targets) and prints
// the resolved project as JSON. It exists because these machines have the docker CLI but
// no compose plugin and no engine; the loader is the same library the plugin uses.
//
// Usage: compose-check [-env KEY=VALUE]... FILE...
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
)

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }

func main() {
	var env multi
	flag.Var(&env, "env", "KEY=VALUE for interpolation (repeatable); the process environment is not used")
	profiles := flag.String("profiles", "", "comma-separated profiles to enable")
	flag.Parse()
	if flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: compose-check [-env KEY=VALUE]... FILE...")
		os.Exit(2)
	}
	opts := []cli.ProjectOptionsFn{cli.WithEnv(env), cli.WithConsistency(true), cli.WithNormalization(true)}
	if *profiles != "" {
		opts = append(opts, cli.WithProfiles(strings.Split(*profiles, ",")))
	}
	o, err := cli.NewProjectOptions(flag.Args(), opts...)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	project, err := o.LoadProject(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out, err := project.MarshalJSON()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Stdout.Write(out)
	os.Stdout.WriteString("\n")
}
