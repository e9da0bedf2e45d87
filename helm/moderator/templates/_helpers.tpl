{{/* Names and labels. */}}
{{- define "moderator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "moderator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "moderator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "moderator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "moderator.testLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ printf "%s-test" (include "moderator.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "moderator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moderator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "moderator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "moderator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* An image reference from {repository, tag, digest}: repository@digest when a digest is set. */}}
{{- define "moderator.imageRef" -}}
{{- if .digest -}}
{{- printf "%s@%s" .repository .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}
{{- end -}}

{{- define "moderator.image" -}}
{{- $variant := ternary "gpu" "cpu" .Values.gpu.enabled -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion $variant) -}}
{{- include "moderator.imageRef" (dict "repository" .Values.image.repository "tag" $tag "digest" .Values.image.digest) -}}
{{- end -}}

{{/* Where the worker container mounts its fixed volumes. */}}
{{- define "moderator.policyDir" -}}/etc/moderator/policy{{- end -}}
{{- define "moderator.kafkaTlsDir" -}}/etc/moderator/kafka-tls{{- end -}}
{{- define "moderator.redisTlsDir" -}}/etc/moderator/redis-tls{{- end -}}

{{- define "moderator.policyConfigMap" -}}
{{- .Values.policy.existingConfigMap | default (printf "%s-policy" (include "moderator.fullname" .)) -}}
{{- end -}}

{{/* Fail early on combinations the schema cannot express. */}}
{{- define "moderator.validate" -}}
{{- if and .Values.autoscaling.keda.enabled .Values.autoscaling.hpa.enabled -}}
{{- fail "autoscaling: enable at most one of keda and hpa (both would fight over the replica count)" -}}
{{- end -}}
{{- if and (eq .Values.model.source "volume") (empty .Values.model.volume) -}}
{{- fail "model.source=volume needs model.volume (a pod volume source, e.g. persistentVolumeClaim)" -}}
{{- end -}}
{{- if .Values.banks.volume -}}
{{- $banks := clean .Values.banks.mountPath -}}
{{- /* the model's path even when baked: the image holds the model there */ -}}
{{- $taken := list (include "moderator.policyDir" .) (include "moderator.kafkaTlsDir" .) (include "moderator.redisTlsDir" .) (clean .Values.model.mountPath) "/tmp" -}}
{{- range $taken -}}
{{- if or (eq $banks "/") (eq $banks .) (hasPrefix (printf "%s/" .) $banks) (hasPrefix (printf "%s/" $banks) .) -}}
{{- fail (printf "banks.mountPath %s overlaps %s (the policy, the model, TLS files or /tmp): give the banks a directory of their own" $banks .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (hasPrefix "SASL" .Values.kafka.securityProtocol) (empty .Values.kafka.sasl.existingSecret) -}}
{{- fail (printf "kafka.securityProtocol=%s needs kafka.sasl.existingSecret" .Values.kafka.securityProtocol) -}}
{{- end -}}
{{- if and (or .Values.kafka.tls.certKey .Values.kafka.tls.keyKey) (not (and .Values.kafka.tls.certKey .Values.kafka.tls.keyKey)) -}}
{{- fail "kafka.tls: set both certKey and keyKey for mutual TLS, or neither" -}}
{{- end -}}
{{- if and .Values.redis.existingSecret (empty .Values.redis.url) -}}
{{- fail "redis.existingSecret is set but redis.url is empty" -}}
{{- end -}}
{{- if and .Values.redis.usernameKey (empty .Values.redis.existingSecret) -}}
{{- fail "redis.usernameKey needs redis.existingSecret (the Secret that holds the user name)" -}}
{{- end -}}
{{- if and .Values.redis.tls.existingSecret (not (hasPrefix "rediss://" .Values.redis.url)) -}}
{{- fail "redis.tls.existingSecret needs a rediss:// redis.url (TLS)" -}}
{{- end -}}
{{- end -}}

{{/* A MODERATOR_* environment variable (value quoted; lists comma-separated, as WorkerSettings reads them). */}}
{{- define "moderator.env" -}}
{{- $v := .value -}}
{{- if kindIs "slice" $v -}}
{{- $v = join "," $v -}}
{{- else if and (kindIs "float64" $v) (eq $v (float64 (int64 $v))) -}}
{{- /* YAML numbers arrive as float64: print 16777216, not 1.6777216e+07 */ -}}
{{- $v = int64 $v -}}
{{- end -}}
- name: {{ printf "MODERATOR_%s" (.name | upper) }}
  value: {{ $v | toString | quote }}
{{- end -}}
