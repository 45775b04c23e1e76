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

{{/*
An image reference: <repository>@<digest> when a digest is given (a digest cannot move; the tag is then
only what it was looked up by), else <repository>:<tag>.
Usage: include "thinkforge.imageRef" (dict "repository" R "tag" T "digest" D)
*/}}
{{- define "thinkforge.imageRef" -}}
{{- if .digest -}}
{{- printf "%s@%s" .repository .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}
{{- end -}}

{{/* The thinkforge image: the Job's containers and (pipeline.setImage) the uploaded pipeline's tasks. */}}
{{- define "thinkforge.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion (include "thinkforge.image.flavor" .)) -}}
{{- include "thinkforge.imageRef" (dict "repository" .Values.image.repository "tag" $tag "digest" .Values.image.digest) -}}
{{- end -}}

{{- define "thinkforge.minio.image" -}}
{{- include "thinkforge.imageRef" .Values.minio.image -}}
{{- end -}}

{{- define "thinkforge.teacher.image" -}}
{{- include "thinkforge.imageRef" .Values.teacher.image -}}
{{- end -}}

{{/* image.flavor, or the one the recipe needs: cuda when a stage requests GPUs, else cpu */}}
{{- define "thinkforge.image.flavor" -}}
{{- if .Values.image.flavor -}}
{{- .Values.image.flavor -}}
{{- else -}}
{{- ternary "cuda" "cpu" (include "thinkforge.recipe" . | fromJson).gpu -}}
{{- end -}}
{{- end -}}

{{/* ---- the recipe: what the chart can know of it at template time ---- */}}

{{/*
The recipes shipped in the image (recipes/*.yaml), as far as the install checks need them. The chart
cannot read files inside the image, so this table stands in; tests/test_helm_recipes.py and
tests/test_security_rbac.py fail when it disagrees with the files. gpu: some stage requests GPUs
(cluster.defaults/stages.*.gpus > 0); multiNode: some training stage has nodes > 1 (a Trainer job);
student: model.student; maxNewTokens: generate.max_new_tokens; storage: object-store size the recipe
needs at least (checkpoints with optimizer state, ~12 bytes a parameter, keep_checkpoints=2 per
training stage, plus rollouts and registry models).
*/}}
{{- define "thinkforge.recipes.known" -}}
recipes/cpu-demo.yaml: {gpu: false, multiNode: false, student: "builtin:smollm2-135m-instruct", maxNewTokens: 96, storage: 10Gi}
recipes/smoke.yaml: {gpu: false, multiNode: false, student: "random:llama-tiny", maxNewTokens: 16, storage: 1Gi}
recipes/phi4-mini-reasoning.yaml: {gpu: true, multiNode: false, student: microsoft/Phi-4-mini-instruct, maxNewTokens: 32768, storage: 500Gi}
{{- end -}}

{{/*
Facts of the recipe the Job uploads, as JSON: source, known, gpu, multiNode (the training stages with
nodes > 1, as a list), student, hubModel, maxNewTokens, storage. An inline pipeline.recipe is read
directly (unset fields take the recipe defaults); a recipe file from the table above;
pipeline.overrides of model.student, generate.max_new_tokens and <stage>.nodes apply.
*/}}
{{- define "thinkforge.recipe" -}}
{{- $v := .Values -}}
{{- $r := dict "source" $v.pipeline.recipeFile "known" false "gpu" false "multiNode" false "student" "" "maxNewTokens" 0 "storage" "" -}}
{{- $nodes := dict -}}
{{- if and $v.pipeline.recipe (kindIs "map" $v.pipeline.recipe) -}}
{{- $rec := $v.pipeline.recipe -}}
{{- $_ := set $r "source" "the inline pipeline.recipe" -}}
{{- $_ = set $r "known" true -}}
{{- $cluster := get $rec "cluster" | default dict -}}
{{- range prepend (values (get $cluster "stages" | default dict)) (get $cluster "defaults" | default dict) -}}
{{- if and (kindIs "map" .) (gt (int (get . "gpus" | default 0)) 0) -}}
{{- $_ = set $r "gpu" true -}}
{{- end -}}
{{- end -}}
{{- $_ = set $r "student" (dig "model" "student" "builtin:smollm2-135m-instruct" $rec) -}}
{{- $_ = set $r "maxNewTokens" (int (dig "generate" "max_new_tokens" 256 $rec)) -}}
{{- range $stage := list "midtrain" "sft" "dpo" "rl" -}}
{{- $sec := get $rec $stage -}}
{{- if and (kindIs "map" $sec) (gt (int (get $sec "nodes" | default 1)) 1) -}}
{{- $_ = set $nodes $stage true -}}
{{- end -}}
{{- end -}}
{{- else -}}
{{- with get (include "thinkforge.recipes.known" . | fromYaml) $v.pipeline.recipeFile -}}
{{- $r = merge (dict "known" true) . $r -}}
{{- end -}}
{{- end -}}
{{- range $v.pipeline.overrides -}}
{{- $kv := splitn "=" 2 (toString .) -}}
{{- if eq $kv._0 "model.student" -}}
{{- $_ := set $r "student" $kv._1 -}}
{{- else if eq $kv._0 "generate.max_new_tokens" -}}
{{- $_ := set $r "maxNewTokens" (int $kv._1) -}}
{{- else if regexMatch "^(midtrain|sft|dpo|rl)[.]nodes$" $kv._0 -}}
{{- $stage := trimSuffix ".nodes" $kv._0 -}}
{{- if gt (int $kv._1) 1 -}}
{{- $_ := set $nodes $stage true -}}
{{- else -}}
{{- $_ := unset $nodes $stage -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* a shipped recipe's table entry says whether it has a multi-node stage (not which) */ -}}
{{- if and (not $nodes) (eq (toString $r.multiNode) "true") -}}
{{- $_ := set $nodes "a training stage" true -}}
{{- end -}}
{{- $_ := set $r "multiNode" (keys $nodes | sortAlpha) -}}
{{- /* a hub name, not builtin:/random:, an object-store URI or a local path */ -}}
{{- $s := toString $r.student -}}
{{- $_ := set $r "hubModel" (and (ne $s "") (not (regexMatch "^(builtin:|random:|[a-z0-9]+://|/|\\.)" $s))) -}}
{{- toJson $r -}}
{{- end -}}

{{/* A Kubernetes quantity (string or number) in GiB, as a float; -1 when it cannot be read. */}}
{{- define "thinkforge.quantityGi" -}}
{{- if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) -}}
{{- divf . 1073741824.0 -}}
{{- else -}}
{{- $q := toString . | trim -}}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $q -}}
{{- $units := dict "" 9.313225746154785e-10 "k" 9.313225746154785e-07 "M" 0.0009313225746154785 "G" 0.9313225746154785 "T" 931.3225746154785 "P" 931322.5746154785 "Ki" 9.5367431640625e-07 "Mi" 0.0009765625 "Gi" 1.0 "Ti" 1024.0 "Pi" 1048576.0 -}}
{{- $unit := trimPrefix $num $q -}}
{{- if and $num (hasKey $units $unit) -}}
{{- mulf (float64 $num) (get $units $unit) -}}
{{- else -}}
-1
{{- end -}}
{{- end -}}
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

{{/* The Pod Security admission labels of podSecurity.* (a level "" sets no label), as YAML. */}}
{{- define "thinkforge.podSecurity.labels" -}}
{{- range $mode := list "enforce" "audit" "warn" -}}
{{- with get $.Values.podSecurity $mode }}
pod-security.kubernetes.io/{{ $mode }}: {{ . }}
pod-security.kubernetes.io/{{ $mode }}-version: {{ $.Values.podSecurity.version }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The same as `key=value` words for `kubectl label`. */}}
{{- define "thinkforge.podSecurity.labelArgs" -}}
{{- $out := list -}}
{{- range $k, $v := include "thinkforge.podSecurity.labels" . | fromYaml -}}
{{- $out = append $out (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- join " " $out -}}
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

{{/* the MinIO volume: minio.persistence.size, else the recipe's estimate, else 50Gi */}}
{{- define "thinkforge.minio.size" -}}
{{- .Values.minio.persistence.size | default (include "thinkforge.recipe" . | fromJson).storage | default "50Gi" -}}
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

{{/* the service account pipeline runs execute as */}}
{{- define "thinkforge.kfp.runServiceAccount" -}}
{{- .Values.kfp.runServiceAccount | default (ternary "default-editor" "pipeline-runner" .Values.kfp.multiUser) -}}
{{- end -}}

{{/*
Why this release must not write kfp-launcher, or nothing. `existing` is the ConfigMap looked up in
the release namespace (empty offline); Helm marks what a release owns with meta.helm.sh/release-*.
Usage: include "thinkforge.kfpLauncher.conflict" (dict "ctx" $ "existing" $cm)
*/}}
{{- define "thinkforge.kfpLauncher.conflict" -}}
{{- $ctx := .ctx -}}
{{- with .existing -}}
{{- $ann := (.metadata | default dict).annotations | default dict -}}
{{- if not (and (eq (get $ann "meta.helm.sh/release-name") $ctx.Release.Name) (eq (get $ann "meta.helm.sh/release-namespace") $ctx.Release.Namespace)) -}}
{{- printf "kfpLauncher.manage: ConfigMap kfp-launcher already exists in namespace %s and is not owned by release %s (standalone KFP ships it; in a multi-user profile namespace the profile controller owns it and would undo changes). Leave kfpLauncher.manage=false and keep KFP's pipeline root, or set its defaultPipelineRoot yourself (kubectl -n %s edit configmap kfp-launcher; for profiles, configure the pipelines profile controller); delete it first only if nothing else manages it" $ctx.Release.Namespace $ctx.Release.Name $ctx.Release.Namespace -}}
{{- end -}}
{{- end -}}
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

{{/* ---- NetworkPolicy and monitoring ---- */}}

{{/*
The Kubernetes API server's CIDRs as a JSON list: networkPolicy.kubeAPIServerCIDRs, else the addresses
of `endpoints` (the default/kubernetes Endpoints), else []. No 0.0.0.0/0 fallback.
Usage: include "thinkforge.networkPolicy.apiServerCIDRs" (dict "ctx" $ "endpoints" $ep)
*/}}
{{- define "thinkforge.networkPolicy.apiServerCIDRs" -}}
{{- $cidrs := list -}}
{{- range (.ctx.Values.networkPolicy.kubeAPIServerCIDRs | default list) -}}
{{- $cidrs = append $cidrs . -}}
{{- end -}}
{{- if not $cidrs -}}
{{- range ((.endpoints | default dict).subsets | default list) -}}
{{- range (.addresses | default list) -}}
{{- $cidrs = append $cidrs (printf "%s/%s" .ip (ternary "128" "32" (contains ":" .ip))) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson $cidrs -}}
{{- end -}}

{{/* the same, looking the Endpoints up in the cluster (empty under `helm template`) */}}
{{- define "thinkforge.networkPolicy.apiServerCIDRs.lookup" -}}
{{- $ep := dict -}}
{{- if not .Values.networkPolicy.kubeAPIServerCIDRs -}}
{{- $ep = lookup "v1" "Endpoints" "default" "kubernetes" -}}
{{- end -}}
{{- include "thinkforge.networkPolicy.apiServerCIDRs" (dict "ctx" . "endpoints" $ep) -}}
{{- end -}}

{{/* true when the cluster serves the Prometheus Operator's API (`helm template`: --api-versions monitoring.coreos.com/v1) */}}
{{- define "thinkforge.monitoring.operatorAPI" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}true{{- end -}}
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
{{- if hasKey $v.rbac "trainer" -}}
{{- $errors = append $errors "rbac.trainer: removed; pipeline runs get Trainer-job rights only with rbac.multiNodeTraining=true (read what it grants in values.yaml first)" -}}
{{- end -}}
{{- if and $v.pipeline.requireImageDigest (not $v.image.digest) -}}
{{- $errors = append $errors (printf "image.digest: required by pipeline.requireImageDigest: the uploaded pipeline version must name its image by digest, not by the tag %q (look it up with `docker buildx imagetools inspect` or `crane digest`, and set image.digest=sha256:...)" (include "thinkforge.image" .)) -}}
{{- end -}}
{{- if not (has $v.image.flavor (list "" "cpu" "cuda")) -}}
{{- $errors = append $errors (printf "image.flavor: must be cpu, cuda or empty (got %q)" (toString $v.image.flavor)) -}}
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
{{- /* the recipe against the image, the object store and the teacher */ -}}
{{- $r := include "thinkforge.recipe" . | fromJson -}}
{{- if not $r.known -}}
{{- if not $v.image.flavor -}}
{{- $errors = append $errors (printf "image.flavor: set cpu or cuda; the chart cannot tell whether %s requests GPUs (it knows %s)" $r.source (keys (include "thinkforge.recipes.known" . | fromYaml) | sortAlpha | join ", ")) -}}
{{- end -}}
{{- else if and (eq $v.image.flavor "cpu") $r.gpu -}}
{{- $errors = append $errors (printf "image.flavor: cpu, but %s requests GPUs: use cuda (or leave image.flavor empty)" $r.source) -}}
{{- else if and (eq $v.image.flavor "cuda") (not $r.gpu) -}}
{{- $errors = append $errors (printf "image.flavor: cuda, but %s requests no GPUs: use cpu (or leave image.flavor empty), or a GPU recipe such as recipes/phi4-mini-reasoning.yaml" $r.source) -}}
{{- end -}}
{{- if and $v.minio.enabled $r.storage $v.minio.persistence.size -}}
{{- $have := include "thinkforge.quantityGi" $v.minio.persistence.size | float64 -}}
{{- if and (ge $have 0.0) (lt $have (include "thinkforge.quantityGi" $r.storage | float64)) -}}
{{- $errors = append $errors (printf "minio.persistence.size: %v is too small for %s, which needs at least %s (checkpoints, rollouts, registry); raise it, leave it empty, or use externalS3" $v.minio.persistence.size $r.source $r.storage) -}}
{{- end -}}
{{- end -}}
{{- if and $v.rbac.create $v.rbac.multiNodeTraining $v.serviceAccount.create (eq (include "thinkforge.kfp.runServiceAccount" .) (include "thinkforge.serviceAccount.name" .)) -}}
{{- $errors = append $errors (printf "kfp.runServiceAccount: %s is the upload Job's own ServiceAccount; with rbac.multiNodeTraining the runs' account gets Trainer-job rights, which the Job must not have: run pipelines as another account" (include "thinkforge.kfp.runServiceAccount" .)) -}}
{{- end -}}
{{- if and $r.multiNode $v.rbac.create (not $v.rbac.multiNodeTraining) -}}
{{- $errors = append $errors (printf "rbac.multiNodeTraining: %s runs %s on several nodes (a Kubeflow Trainer job), which pipeline runs may only submit with rbac.multiNodeTraining=true; that lets every run create pods that can read every Secret in namespace %s (see values.yaml), or keep the stages on one node (nodes=1)" $r.source (join ", " $r.multiNode) .Release.Namespace) -}}
{{- end -}}
{{- if and $v.teacher.enabled $r.maxNewTokens -}}
{{- $need := add (int $v.teacher.maxPromptTokens) (int $r.maxNewTokens) -}}
{{- if lt (int $v.teacher.maxModelLen) $need -}}
{{- $errors = append $errors (printf "teacher.maxModelLen: %d cannot hold a prompt (teacher.maxPromptTokens %d) plus generate.max_new_tokens %d of %s: set it to at least %d" (int $v.teacher.maxModelLen) (int $v.teacher.maxPromptTokens) (int $r.maxNewTokens) $r.source $need) -}}
{{- end -}}
{{- end -}}
{{- /* kfp-launcher belongs to KFP unless this release already owns it */ -}}
{{- if $v.kfpLauncher.manage -}}
{{- with include "thinkforge.kfpLauncher.conflict" (dict "ctx" . "existing" (lookup "v1" "ConfigMap" .Release.Namespace "kfp-launcher")) -}}
{{- $errors = append $errors . -}}
{{- end -}}
{{- end -}}
{{- if $v.networkPolicy.enabled -}}
{{- if not (include "thinkforge.networkPolicy.apiServerCIDRs.lookup" . | fromJsonArray) -}}
{{- $errors = append $errors "networkPolicy.kubeAPIServerCIDRs: required: the API server's endpoints could not be looked up (helm template, GitOps, or no right to read endpoints/kubernetes in default); list them (kubectl get endpoints -n default kubernetes -o jsonpath='{.subsets[*].addresses[*].ip}', as a.b.c.d/32), or set networkPolicy.enabled=false" -}}
{{- end -}}
{{- if and $v.networkPolicy.huggingFaceHub.enabled (not $v.networkPolicy.huggingFaceHub.cidrs) -}}
{{- $errors = append $errors "networkPolicy.huggingFaceHub.cidrs: list the CIDRs of huggingface.co and its download CDN (or your proxy's; [0.0.0.0/0] allows any HTTPS) when huggingFaceHub.enabled=true" -}}
{{- end -}}
{{- if and $r.hubModel (not $v.networkPolicy.huggingFaceHub.enabled) -}}
{{- $errors = append $errors (printf "networkPolicy.huggingFaceHub.enabled: %s downloads %s from the Hugging Face Hub, which the policy would block: enable it (with cidrs), or point model.student at an object-store copy (pipeline.overrides: model.student=minio://...)" $r.source $r.student) -}}
{{- end -}}
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
