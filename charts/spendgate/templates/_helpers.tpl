{{/* Names ------------------------------------------------------------------------------- */}}

{{- define "spendgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "spendgate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "spendgate.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "spendgate.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "spendgate.operator.fullname" -}}
{{- printf "%s-operator" (include "spendgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "spendgate.webhook.serviceName" -}}
{{- printf "%s-webhook" (include "spendgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "spendgate.webhook.secretName" -}}
{{- if eq .Values.webhook.certificates.mode "existingSecret" }}
{{- required "webhook.certificates.existingSecret.name is required with mode existingSecret" .Values.webhook.certificates.existingSecret.name }}
{{- else }}
{{- printf "%s-webhook-tls" (include "spendgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "spendgate.redis.fullname" -}}
{{- printf "%s-redis" (include "spendgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "spendgate.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "spendgate.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels ------------------------------------------------------------------------------ */}}

{{- define "spendgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "spendgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: spendgate
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "operator"). */}}
{{- define "spendgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spendgate.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "spendgate.componentLabels" -}}
{{ include "spendgate.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Images ------------------------------------------------------------------------------ */}}

{{- define "spendgate.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "spendgate.sidecarImage" -}}
{{- if or .Values.sidecar.image.repository .Values.sidecar.image.tag }}
{{- $repository := default .Values.image.repository .Values.sidecar.image.repository }}
{{- printf "%s:%s" $repository (default (default .Chart.AppVersion .Values.image.tag) .Values.sidecar.image.tag) }}
{{- else }}
{{- include "spendgate.image" . }}
{{- end }}
{{- end }}

{{/* Security: Pod Security "restricted" for every container the chart runs. --------------- */}}

{{- define "spendgate.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid | default 65532 }}
runAsGroup: {{ .uid | default 65532 }}
fsGroup: {{ .uid | default 65532 }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "spendgate.containerSecurityContext" -}}
runAsNonRoot: true
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Redis ------------------------------------------------------------------------------- */}}

{{- define "spendgate.redis.cluster" -}}
{{- and (eq .Values.redis.mode "external") .Values.redis.external.cluster | toString }}
{{- end }}

{{/* The bundled Redis's password: the one in the existing Secret (kept across upgrades),
     else a new random one. Called once per render by redis/secret.yaml. */}}
{{- define "spendgate.redis.password" -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace .Values.redis.secret.name }}
{{- if and $existing (index ($existing.data | default dict) "password") }}
{{- index $existing.data "password" | b64dec }}
{{- else }}
{{- randAlphaNum 32 }}
{{- end }}
{{- end }}

{{/* The Redis URL that goes into the Secret's "url" key. Takes (dict "ctx" $ "password" P). */}}
{{- define "spendgate.redis.url" -}}
{{- $v := .ctx.Values.redis }}
{{- if eq $v.mode "bundled" }}
{{- printf "redis://:%s@%s.%s.svc:6379/0" .password (include "spendgate.redis.fullname" .ctx) .ctx.Release.Namespace }}
{{- else if $v.external.sentinel.enabled }}
{{- $s := $v.external.sentinel }}
{{- if not $s.hosts }}{{ fail "redis.external.sentinel.hosts: list at least one Sentinel (host:port)" }}{{ end }}
{{- $auth := ternary (printf ":%s@" $s.password) "" (ne $s.password "") }}
{{- printf "%s://%s%s/%s/%d" (ternary "rediss+sentinel" "redis+sentinel" $v.external.tls.enabled) $auth (join "," $s.hosts) $s.masterName (int $s.db) }}
{{- else }}
{{- $url := required "redis.external.url is required with redis.mode external (or set redis.secret.create: false and create the Secret)" $v.external.url }}
{{- if and $v.external.tls.enabled (not (hasPrefix "rediss://" $url)) }}
{{- fail (printf "redis.external.tls.enabled needs a rediss:// URL, got %s://..." (regexFind "^[a-z+]*" $url)) }}
{{- end }}
{{- $url }}
{{- end }}
{{- end }}

{{/* Namespaces the Redis Secret is rendered into: the release's and the model namespaces. */}}
{{- define "spendgate.redis.secretNamespaces" -}}
{{- $namespaces := list .Release.Namespace }}
{{- range .Values.redis.secret.copyToNamespaces }}
{{- $namespaces = append $namespaces . }}
{{- end }}
{{- $namespaces | uniq | toJson }}
{{- end }}
