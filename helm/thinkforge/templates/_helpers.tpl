{{/*
Names follow thinkforge.<component>.<thing>. Every object carries app.kubernetes.io/part-of=thinkforge
and app.kubernetes.io/component=<component>; the NetworkPolicy and the PodMonitor select on them.
*/}}

{{- define "thinkforge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "thinkforge.fullname" -}}
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

{{- define "thinkforge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels. Usage: include "thinkforge.selectorLabels" (dict "ctx" $ "component" "minio") */}}
{{- define "thinkforge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "thinkforge.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels. Usage: include "thinkforge.labels" (dict "ctx" $ "component" "minio") */}}
{{- define "thinkforge.labels" -}}
helm.sh/chart: {{ include "thinkforge.chart" .ctx }}
{{ include "thinkforge.selectorLabels" . }}
app.kubernetes.io/part-of: thinkforge
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "thinkforge.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.image.flavor) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "thinkforge.serviceAccount.name" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "thinkforge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "thinkforge.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}

{{- define "thinkforge.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext -}}
{{- end -}}

{{/* ---- object storage: the bundled MinIO or an external S3 ---- */}}

{{- define "thinkforge.minio.fullname" -}}
{{- printf "%s-minio" (include "thinkforge.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "thinkforge.s3.secretName" -}}
{{- if .Values.minio.enabled -}}
{{- .Values.minio.auth.existingSecret | default (printf "%s-s3" (include "thinkforge.fullname" .)) -}}
{{- else -}}
{{- .Values.externalS3.existingSecret | default (printf "%s-s3" (include "thinkforge.fullname" .)) -}}
{{- end -}}
{{- end -}}

{{/* true when the chart writes the S3 credentials Secret itself */}}
{{- define "thinkforge.s3.createSecret" -}}
{{- if .Values.minio.enabled -}}
{{- if not .Values.minio.auth.existingSecret -}}true{{- end -}}
{{- else if not .Values.externalS3.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* host:port of the object store */}}
{{- define "thinkforge.s3.endpoint" -}}
{{- if .Values.minio.enabled -}}
{{- printf "%s.%s.svc:9000" (include "thinkforge.minio.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- .Values.externalS3.endpoint -}}
{{- end -}}
{{- end -}}

{{- define "thinkforge.s3.secure" -}}
{{- if .Values.minio.enabled -}}false{{- else -}}{{ .Values.externalS3.secure }}{{- end -}}
{{- end -}}

{{- define "thinkforge.s3.bucket" -}}
{{- if .Values.minio.enabled -}}{{ .Values.minio.bucket }}{{- else -}}{{ .Values.externalS3.bucket }}{{- end -}}
{{- end -}}

{{/* The MinIO root password: the value, else the one already in the cluster, else a new random one. */}}
{{- define "thinkforge.minio.rootPassword" -}}
{{- if .Values.minio.auth.rootPassword -}}
{{- .Values.minio.auth.rootPassword -}}
{{- else -}}
{{- $old := lookup "v1" "Secret" .Release.Namespace (include "thinkforge.s3.secretName" .) -}}
{{- if and $old $old.data (hasKey $old.data "secretkey") -}}
{{- index $old.data "secretkey" | b64dec -}}
{{- else -}}
{{- randAlphaNum 32 -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* ---- Kubeflow Pipelines ---- */}}

{{- define "thinkforge.kfp.host" -}}
{{- .Values.kfp.host | default (printf "http://ml-pipeline.%s.svc.cluster.local:8888" .Values.kfp.namespace) -}}
{{- end -}}

{{- define "thinkforge.kfpLauncher.pipelineRoot" -}}
{{- if .Values.kfpLauncher.pipelineRoot -}}
{{- .Values.kfpLauncher.pipelineRoot -}}
{{- else if .Values.minio.enabled -}}
{{- printf "minio://%s/pipelines" .Values.minio.bucket -}}
{{- else -}}
{{- printf "s3://%s/pipelines" .Values.externalS3.bucket -}}
{{- end -}}
{{- end -}}

{{- define "thinkforge.upload.version" -}}
{{- .Values.pipeline.version | default (printf "%s-r%d" .Chart.AppVersion (int .Release.Revision)) -}}
{{- end -}}

{{- define "thinkforge.upload.recipeConfigMap" -}}
{{- printf "%s-recipe" (include "thinkforge.fullname" .) -}}
{{- end -}}

{{/* ---- teacher and secrets ---- */}}

{{- define "thinkforge.teacher.fullname" -}}
{{- printf "%s-teacher" (include "thinkforge.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* OpenAI-compatible base URL of the teacher */}}
{{- define "thinkforge.teacher.url" -}}
{{- printf "http://%s.%s.svc:%d/v1" (include "thinkforge.teacher.fullname" .) .Release.Namespace (int .Values.teacher.port) -}}
{{- end -}}

{{- define "thinkforge.teacher.secretName" -}}
{{- .Values.secrets.teacherApiKey.existingSecret | default (printf "%s-teacher" (include "thinkforge.fullname" .)) -}}
{{- end -}}

{{/* the teacher API key Secret exists when the teacher runs or a key or existing Secret was given */}}
{{- define "thinkforge.teacher.hasSecret" -}}
{{- if or .Values.teacher.enabled .Values.secrets.teacherApiKey.value .Values.secrets.teacherApiKey.existingSecret -}}true{{- end -}}
{{- end -}}

{{- define "thinkforge.teacher.apiKey" -}}
{{- if .Values.secrets.teacherApiKey.value -}}
{{- .Values.secrets.teacherApiKey.value -}}
{{- else -}}
{{- $old := lookup "v1" "Secret" .Release.Namespace (include "thinkforge.teacher.secretName" .) -}}
{{- if and $old $old.data (hasKey $old.data .Values.secrets.teacherApiKey.key) -}}
{{- index $old.data .Values.secrets.teacherApiKey.key | b64dec -}}
{{- else -}}
{{- randAlphaNum 40 -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "thinkforge.hfToken.secretName" -}}
{{- .Values.secrets.hfToken.existingSecret | default (printf "%s-hf" (include "thinkforge.fullname" .)) -}}
{{- end -}}

{{- define "thinkforge.hfToken.enabled" -}}
{{- if or .Values.secrets.hfToken.value .Values.secrets.hfToken.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* S3 credentials as env, for thinkforge containers. */}}
{{- define "thinkforge.s3.env" -}}
- name: THINKFORGE_S3_ENDPOINT
  value: {{ include "thinkforge.s3.endpoint" . | quote }}
- name: THINKFORGE_S3_SECURE
  value: {{ include "thinkforge.s3.secure" . | quote }}
- name: THINKFORGE_S3_BUCKET
  value: {{ include "thinkforge.s3.bucket" . | quote }}
- name: THINKFORGE_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "thinkforge.s3.secretName" . }}
      key: accesskey
- name: THINKFORGE_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "thinkforge.s3.secretName" . }}
      key: secretkey
{{- end -}}

{{/*
One place for the rules that span several values. Every problem is collected first, then the render
fails once with all of them, so a user fixes a values file in one round.
*/}}
{{- define "thinkforge.validateValues" -}}
{{- $errors := list -}}
{{- $v := .Values -}}
{{- if not $v.image.repository -}}
{{- $errors = append $errors "image.repository: must not be empty" -}}
{{- end -}}
{{- if not (has $v.image.flavor (list "cpu" "cuda")) -}}
{{- $errors = append $errors (printf "image.flavor: must be cpu or cuda (got %q)" (toString $v.image.flavor)) -}}
{{- end -}}
{{- if not $v.minio.enabled -}}
{{- if not $v.externalS3.endpoint -}}
{{- $errors = append $errors "externalS3.endpoint: required when minio.enabled=false (host:port of your S3)" -}}
{{- else if not (regexMatch "^[A-Za-z0-9.-]+(:[0-9]+)?$" $v.externalS3.endpoint) -}}
{{- $errors = append $errors (printf "externalS3.endpoint: expected host:port without a scheme (got %q)" $v.externalS3.endpoint) -}}
{{- end -}}
{{- if and (not $v.externalS3.existingSecret) (not (and $v.externalS3.accessKey $v.externalS3.secretKey)) -}}
{{- $errors = append $errors "externalS3: set existingSecret, or both accessKey and secretKey, when minio.enabled=false" -}}
{{- end -}}
{{- if and $v.networkPolicy.enabled (not $v.networkPolicy.externalS3CIDRs) -}}
{{- $errors = append $errors "networkPolicy.externalS3CIDRs: list the S3 endpoint's CIDRs when minio.enabled=false (or set networkPolicy.enabled=false)" -}}
{{- end -}}
{{- else if and $v.minio.auth.existingSecret $v.minio.auth.rootPassword -}}
{{- $errors = append $errors "minio.auth: set rootPassword or existingSecret, not both" -}}
{{- end -}}
{{- if $v.schedule.enabled -}}
{{- if not $v.upload.enabled -}}
{{- $errors = append $errors "schedule.enabled: needs upload.enabled=true (the upload Job creates the recurring run)" -}}
{{- end -}}
{{- $cron := $v.schedule.cron | toString | trim -}}
{{- if hasPrefix "@" $cron -}}
{{- if not (regexMatch "^@(yearly|annually|monthly|weekly|daily|midnight|hourly|every [0-9hms.]+)$" $cron) -}}
{{- $errors = append $errors (printf "schedule.cron: unknown descriptor %q (use @hourly, @daily, @weekly, @monthly, @yearly or @every <duration>)" $cron) -}}
{{- end -}}
{{- else -}}
{{- $fields := regexSplit "\\s+" $cron -1 -}}
{{- if ne (len $fields) 6 -}}
{{- $errors = append $errors (printf "schedule.cron: KFP cron has 6 fields (second minute hour day-of-month month day-of-week), got %d in %q; e.g. \"0 0 3 * * 0\"" (len $fields) $cron) -}}
{{- else if not (regexMatch "^[0-9A-Za-z*?/,-]+( [0-9A-Za-z*?/,-]+){5}$" (join " " $fields)) -}}
{{- $errors = append $errors (printf "schedule.cron: fields may hold digits, names, * ? / , - only (got %q)" $cron) -}}
{{- end -}}
{{- end -}}
{{- if lt (int $v.schedule.maxConcurrency) 1 -}}
{{- $errors = append $errors "schedule.maxConcurrency: must be >= 1" -}}
{{- end -}}
{{- end -}}
{{- range $i, $o := concat $v.pipeline.overrides $v.schedule.params -}}
{{- if not (regexMatch "^[a-z_]+\\.[a-z_0-9]+=" (toString $o)) -}}
{{- $errors = append $errors (printf "pipeline.overrides/schedule.params: %q is not section.field=value" (toString $o)) -}}
{{- end -}}
{{- end -}}
{{- if and $v.pipeline.recipe (not (kindIs "map" $v.pipeline.recipe)) -}}
{{- $errors = append $errors "pipeline.recipe: must be a mapping of recipe sections" -}}
{{- end -}}
{{- if not (or $v.pipeline.recipe $v.pipeline.recipeFile) -}}
{{- $errors = append $errors "pipeline: set recipeFile or recipe" -}}
{{- end -}}
{{- if $v.teacher.enabled -}}
{{- if not $v.teacher.model -}}
{{- $errors = append $errors "teacher.model: required when teacher.enabled=true" -}}
{{- end -}}
{{- if lt (int $v.teacher.gpus) 1 -}}
{{- $errors = append $errors "teacher.gpus: must be >= 1 (vLLM needs a GPU)" -}}
{{- end -}}
{{- end -}}
{{- range $name, $s := $v.secrets -}}
{{- if and $s.value $s.existingSecret -}}
{{- $errors = append $errors (printf "secrets.%s: set value or existingSecret, not both" $name) -}}
{{- end -}}
{{- end -}}
{{- if and $v.monitoring.enabled $v.monitoring.prometheusRule.enabled (not (.Files.Get "files/prometheus-rules.yaml")) -}}
{{- $errors = append $errors "monitoring.prometheusRule.enabled: files/prometheus-rules.yaml is missing from the chart" -}}
{{- end -}}
{{- if and $v.monitoring.enabled $v.monitoring.grafanaDashboard.enabled (not (.Files.Get "files/grafana-dashboard.json")) -}}
{{- $errors = append $errors "monitoring.grafanaDashboard.enabled: files/grafana-dashboard.json is missing from the chart" -}}
{{- end -}}
{{- if $errors -}}
{{- printf "\nthinkforge: %d invalid value(s):\n  - %s" (len $errors) (join "\n  - " $errors) | fail -}}
{{- end -}}
{{- end -}}

{{/* env and mounts of the upload/schedule containers */}}
{{- define "thinkforge.upload.env" -}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: HF_HOME
  value: /tmp/.cache/huggingface
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: KF_PIPELINES_SA_TOKEN_PATH
  value: /var/run/secrets/kubeflow/pipelines/token
{{- end -}}

{{- define "thinkforge.upload.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: kfp-token
  mountPath: /var/run/secrets/kubeflow/pipelines
  readOnly: true
{{- if .Values.pipeline.recipe }}
- name: recipe
  mountPath: /etc/thinkforge
  readOnly: true
{{- end }}
{{- end -}}
