{{/*
Names, labels, images and shared snippets for the agent-sessions chart.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "agent-sessions.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource name. Truncated to 52 characters so that the
longest suffix used here ("-migrate", "-runner") keeps names within the
63-character limit of DNS labels.
*/}}
{{- define "agent-sessions.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "agent-sessions.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. Call with (dict "ctx" $ "component" "api"). */}}
{{- define "agent-sessions.labels" -}}
helm.sh/chart: {{ include "agent-sessions.chart" .ctx }}
{{ include "agent-sessions.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: agent-sessions
{{- end }}

{{/* The immutable subset used in selectors. Call with (dict "ctx" $ "component" "api"). */}}
{{- define "agent-sessions.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agent-sessions.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The one image of every subcommand. */}}
{{- define "agent-sessions.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The Claude Code worker image, for pods the runner creates. */}}
{{- define "agent-sessions.workerImage" -}}
{{- if .Values.workerImage.digest }}
{{- printf "%s@%s" .Values.workerImage.repository .Values.workerImage.digest }}
{{- else }}
{{- printf "%s:%s" .Values.workerImage.repository (default .Chart.AppVersion .Values.workerImage.tag) }}
{{- end }}
{{- end }}

{{- define "agent-sessions.apiServiceAccountName" -}}
{{- default (printf "%s-api" (include "agent-sessions.fullname" .)) .Values.api.serviceAccount.name }}
{{- end }}

{{- define "agent-sessions.runnerServiceAccountName" -}}
{{- default (printf "%s-runner" (include "agent-sessions.fullname" .)) .Values.runner.serviceAccount.name }}
{{- end }}

{{/* Where worker pods and their claims live, and so the runner's Role. */}}
{{- define "agent-sessions.runnerNamespace" -}}
{{- default .Release.Namespace .Values.runner.namespace }}
{{- end }}

{{/* The API as the runner reaches it, through the Service. */}}
{{- define "agent-sessions.apiUrl" -}}
{{- printf "http://%s-api.%s.svc:%d" (include "agent-sessions.fullname" .) .Release.Namespace (int .Values.api.service.port) }}
{{- end }}

{{/*
Non-secret settings as NAME: "value" lines: the ConfigMap's data, and the
migration Job's inline env (read back with fromYaml).
*/}}
{{- define "agent-sessions.configData" -}}
{{- $c := .Values.config -}}
APP__SERVER__HOST: "0.0.0.0"
APP__SERVER__PORT: {{ .Values.api.port | int64 | toString | quote }}
APP__SERVER__BODY_LIMIT_BYTES: {{ $c.server.bodyLimitBytes | int64 | toString | quote }}
APP__SERVER__SHUTDOWN_TIMEOUT_SECS: {{ $c.server.shutdownTimeoutSecs | int64 | toString | quote }}
APP__DATABASE__MAX_CONNECTIONS: {{ $c.database.maxConnections | int64 | toString | quote }}
APP__DATABASE__MIN_CONNECTIONS: {{ $c.database.minConnections | int64 | toString | quote }}
APP__DATABASE__ACQUIRE_TIMEOUT_MS: {{ $c.database.acquireTimeoutMs | int64 | toString | quote }}
APP__REDIS__CHANNEL_PREFIX: {{ $c.redis.channelPrefix | quote }}
APP__LOG__FORMAT: {{ $c.log.format | quote }}
APP__LOG__FILTER: {{ $c.log.filter | quote }}
APP__API__DEFAULT_PAGE_SIZE: {{ $c.api.defaultPageSize | int64 | toString | quote }}
APP__API__MAX_PAGE_SIZE: {{ $c.api.maxPageSize | int64 | toString | quote }}
APP__API__MAX_INPUT_BYTES: {{ $c.api.maxInputBytes | int64 | toString | quote }}
APP__API__MAX_TRANSCRIPT_BYTES: {{ $c.api.maxTranscriptBytes | int64 | toString | quote }}
APP__API__MAX_IMPORT_BYTES: {{ $c.api.maxImportBytes | int64 | toString | quote }}
APP__AUTH__ENABLED: {{ $c.auth.enabled | toString | quote }}
APP__RETENTION__DELETE_STATUSES: {{ $c.retention.deleteStatuses | quote }}
APP__RETENTION__IDEMPOTENCY_KEY_TTL_SECS: {{ $c.retention.idempotencyKeyTtlSecs | int64 | toString | quote }}
APP__RETENTION__SWEEP_INTERVAL_SECS: {{ $c.retention.sweepIntervalSecs | int64 | toString | quote }}
{{- if gt ($c.retention.deleteAfterSecs | int64) 0 }}
APP__RETENTION__DELETE_AFTER_SECS: {{ $c.retention.deleteAfterSecs | int64 | toString | quote }}
{{- end }}
{{- if gt ($c.retention.purgeAfterSecs | int64) 0 }}
APP__RETENTION__PURGE_AFTER_SECS: {{ $c.retention.purgeAfterSecs | int64 | toString | quote }}
{{- end }}
{{- range $name, $value := $c.extra }}
{{ $name }}: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* An env entry read from a Secret. Call with (dict "name" "X" "secret" "s" "key" "k"). */}}
{{- define "agent-sessions.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret | quote }}
      key: {{ .key | quote }}
{{- end }}

{{/* A writable /tmp, since the root filesystem is read-only. */}}
{{- define "agent-sessions.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end }}

{{- define "agent-sessions.tmpVolumeMount" -}}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/*
One NetworkPolicy egress rule. Call with
(dict "to" <peers> "ports" <ints> "protocols" (list "TCP")); no peers means
any destination on those ports.
*/}}
{{- define "agent-sessions.egressRule" -}}
- ports:
  {{- range $port := .ports }}
  {{- range $protocol := $.protocols }}
    - port: {{ $port }}
      protocol: {{ $protocol }}
  {{- end }}
  {{- end }}
  {{- with .to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
