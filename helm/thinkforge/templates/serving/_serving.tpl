{{/* ---- serving the registry's champion (values.serving) ---- */}}

{{- define "thinkforge.serving.fullname" -}}
{{- printf "%s-serving" (include "thinkforge.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "thinkforge.serving.vllmImage" -}}
{{- include "thinkforge.imageRef" .Values.serving.vllm.image -}}
{{- end -}}

{{/* The object the publish step patches on a promotion, as <kind>/<name> (THINKFORGE_SERVING_TARGET). */}}
{{- define "thinkforge.serving.target" -}}
{{- printf "%s/%s" (ternary "inferenceservice" "deployment" (eq .Values.serving.mode "kserve")) (include "thinkforge.serving.fullname" .) -}}
{{- end -}}

{{/* registry/<model>: the registry entry's key prefix in the bucket */}}
{{- define "thinkforge.serving.registryRoot" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.serving.registryPrefix) .Values.serving.model -}}
{{- end -}}

{{/*
The champion version the chart renders: serving.champion, else the one the last promotion patched into
the live object (its thinkforge.dev/champion annotation; nothing under `helm template`), else "".
*/}}
{{- define "thinkforge.serving.champion" -}}
{{- if .Values.serving.champion -}}
{{- .Values.serving.champion -}}
{{- else if eq .Values.serving.mode "kserve" -}}
{{- $live := lookup "serving.kserve.io/v1beta1" "InferenceService" .Release.Namespace (include "thinkforge.serving.fullname" .) -}}
{{- if $live -}}{{- dig "metadata" "annotations" "thinkforge.dev/champion" "" $live -}}{{- end -}}
{{- else -}}
{{- $live := lookup "apps/v1" "Deployment" .Release.Namespace (include "thinkforge.serving.fullname" .) -}}
{{- if $live -}}{{- dig "spec" "template" "metadata" "annotations" "thinkforge.dev/champion" "" $live -}}{{- end -}}
{{- end -}}
{{- end -}}

{{/* Fail the render with every serving problem at once. */}}
{{- define "thinkforge.serving.validate" -}}
{{- $errors := list -}}
{{- $s := .Values.serving -}}
{{- if not $s.model -}}
{{- $errors = append $errors "serving.model: the registry entry to serve (the runs' registry.name, default run.name) must be set with serving.enabled" -}}
{{- end -}}
{{- if and (eq $s.mode "kserve") (not (include "thinkforge.serving.champion" .)) -}}
{{- $errors = append $errors "serving.champion: mode kserve needs the version to serve on the first install (the \"version\" of registry/<model>/champion.json); later promotions patch the InferenceService" -}}
{{- end -}}
{{- if and (eq $s.mode "kserve") (not $s.kserve.s3Secret) (not (include "thinkforge.s3.createSecret" .)) -}}
{{- $errors = append $errors "serving.kserve.s3Secret: the S3 credentials come from an existingSecret, so KServe's credential Secret (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, serving.kserve.io/s3-* annotations) must be named here" -}}
{{- end -}}
{{- if and (eq $s.mode "kserve") (not $s.kserve.s3Secret) .Values.minio.enabled (include "thinkforge.s3.createSecret" .) (not .Values.minio.auth.rootPassword) -}}
{{- if not (lookup "v1" "Secret" .Release.Namespace (include "thinkforge.s3.secretName" .)) -}}
{{- $errors = append $errors "minio.auth.rootPassword: mode kserve copies the MinIO credentials into KServe's Secret, so on the first install the password must be given (a random one would differ between the two Secrets); or name your own Secrets with minio.auth.existingSecret and serving.kserve.s3Secret" -}}
{{- end -}}
{{- end -}}
{{- if and (eq $s.mode "kserve") (lt (int $s.kserve.maxReplicas) (int $s.kserve.minReplicas)) -}}
{{- $errors = append $errors "serving.kserve.maxReplicas: must be >= minReplicas" -}}
{{- end -}}
{{- if $errors -}}
{{- fail (printf "\n%s" (join "\n" $errors)) -}}
{{- end -}}
{{- end -}}

{{/* The server's arguments after the model path (both modes). */}}
{{- define "thinkforge.serving.args" -}}
- --served-model-name={{ .Values.serving.servedModelName }}
- --tensor-parallel-size={{ max 1 (int .Values.serving.gpus) }}
- --max-model-len={{ .Values.serving.maxModelLen }}
- --gpu-memory-utilization={{ .Values.serving.gpuMemoryUtilization }}
{{- range .Values.serving.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{- define "thinkforge.serving.resources" -}}
requests:
  {{- toYaml .Values.serving.resources.requests | nindent 2 }}
  {{- if not (hasKey .Values.serving.resources.requests "ephemeral-storage") }}
  ephemeral-storage: {{ .Values.serving.modelSize }}
  {{- end }}
  {{- if gt (int .Values.serving.gpus) 0 }}
  nvidia.com/gpu: {{ .Values.serving.gpus }}
  {{- end }}
limits:
  {{- with .Values.serving.resources.limits }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- if gt (int .Values.serving.gpus) 0 }}
  nvidia.com/gpu: {{ .Values.serving.gpus }}
  {{- end }}
{{- end -}}
