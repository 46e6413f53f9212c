{{/*
Names, labels and the pieces several templates share. Resource names are cut to 63
characters (DNS label limit); suffixed names cut the prefix so the suffix survives.
*/}}

{{- define "ccoe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ccoe.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* FULLNAME-SUFFIX within 63 characters: (dict "root" $ "suffix" "redis") */}}
{{- define "ccoe.suffixed" -}}
{{- $suffix := printf "-%s" .suffix }}
{{- printf "%s%s" (include "ccoe.fullname" .root | trunc (int (sub 63 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{- define "ccoe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ccoe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ccoe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ccoe.labels" -}}
helm.sh/chart: {{ include "ccoe.chart" . }}
{{ include "ccoe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ccoe-serve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of one component: (dict "root" $ "component" "redis") */}}
{{- define "ccoe.componentLabels" -}}
{{ include "ccoe.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "ccoe.componentSelector" -}}
{{ include "ccoe.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The Ray pods of the release (head and workers of every Ray cluster it has). */}}
{{- define "ccoe.rayPodSelector" -}}
matchLabels:
  {{- include "ccoe.selectorLabels" . | nindent 2 }}
matchExpressions:
  - key: app.kubernetes.io/component
    operator: In
    values: [ray-head, ray-worker]
{{- end }}

{{/*
Labels of the Ray pod templates: stable ones only. A label that changes with the chart or app
version would change rayClusterConfig, and KubeRay would replace the whole Ray cluster.
*/}}
{{- define "ccoe.podLabels" -}}
{{ include "ccoe.componentSelector" . }}
app.kubernetes.io/part-of: ccoe-serve
{{- with .root.Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "ccoe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ccoe.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ccoe.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion (ternary "cuda" "cpu" .Values.gpu.enabled)) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "ccoe.workerGroup" -}}
{{- .Values.workers.groupName | default (ternary "gpu-workers" "cpu-workers" .Values.gpu.enabled) }}
{{- end }}

{{- define "ccoe.gpuCount" -}}
{{- if .Values.gpu.enabled }}{{ .Values.gpu.count | default 1 }}{{ else }}0{{ end }}
{{- end }}

{{- define "ccoe.gpuPerReplica" -}}
{{- if .Values.gpu.enabled }}{{ .Values.gpu.perReplica | default 1 }}{{ else }}0{{ end }}
{{- end }}

{{/* ---- secrets, by reference only ---------------------------------------------------- */}}

{{- define "ccoe.redisSecretName" -}}
{{- if .Values.redis.enabled }}
{{- .Values.redis.auth.existingSecret | default (include "ccoe.suffixed" (dict "root" . "suffix" "redis")) }}
{{- else }}
{{- .Values.redis.external.existingSecret }}
{{- end }}
{{- end }}

{{- define "ccoe.redisPasswordKey" -}}
{{- ternary .Values.redis.auth.passwordKey .Values.redis.external.passwordKey .Values.redis.enabled }}
{{- end }}

{{- define "ccoe.redisHost" -}}
{{- printf "%s.%s.svc" (include "ccoe.suffixed" (dict "root" . "suffix" "redis")) .Release.Namespace }}
{{- end }}

{{/* The registry's Redis URL: never with a password (that comes from CCOE_REDIS_PASSWORD). */}}
{{- define "ccoe.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s:6379/%d" (include "ccoe.redisHost" .) (int .Values.redis.database) }}
{{- else }}
{{- .Values.redis.external.url }}
{{- end }}
{{- end }}

{{- define "ccoe.authSecretName" -}}
{{- .Values.auth.existingSecret | default (include "ccoe.suffixed" (dict "root" . "suffix" "auth")) }}
{{- end }}

{{- define "ccoe.artifactClaim" -}}
{{- .Values.artifacts.pvc.existingClaim | default (include "ccoe.suffixed" (dict "root" . "suffix" "artifacts")) }}
{{- end }}

{{/* ---- paths inside the Ray pods ----------------------------------------------------- */}}

{{- define "ccoe.configDir" -}}/etc/ccoe/config{{- end }}
{{- define "ccoe.authDir" -}}/etc/ccoe/auth{{- end }}
{{- define "ccoe.replicaAuthDir" -}}/etc/ccoe/replica-auth{{- end }}

{{/* ---- checks that span values (the schema checks each value alone) -------------------- */}}

{{- define "ccoe.validate" -}}
{{- $v := .Values }}
{{- if gt (int $v.workers.minReplicas) (int $v.workers.maxReplicas) }}
{{- fail (printf "workers.minReplicas (%d) is above workers.maxReplicas (%d)" (int $v.workers.minReplicas) (int $v.workers.maxReplicas)) }}
{{- end }}
{{- if or (lt (int $v.workers.replicas) (int $v.workers.minReplicas)) (gt (int $v.workers.replicas) (int $v.workers.maxReplicas)) }}
{{- fail (printf "workers.replicas (%d) must lie between workers.minReplicas (%d) and workers.maxReplicas (%d)" (int $v.workers.replicas) (int $v.workers.minReplicas) (int $v.workers.maxReplicas)) }}
{{- end }}
{{- if gt (int $v.replicas.autoscaling.minReplicas) (int $v.replicas.autoscaling.maxReplicas) }}
{{- fail (printf "replicas.autoscaling.minReplicas (%d) is above replicas.autoscaling.maxReplicas (%d)" (int $v.replicas.autoscaling.minReplicas) (int $v.replicas.autoscaling.maxReplicas)) }}
{{- end }}
{{- range $k := list "min_replicas" "max_replicas" "initial_replicas" }}
{{- if hasKey $v.replicas.autoscaling.config $k }}
{{- fail (printf "replicas.autoscaling.config.%s: use replicas.autoscaling.minReplicas/maxReplicas (initial = the minimum)" $k) }}
{{- end }}
{{- end }}
{{- if $v.gpu.enabled }}
{{- $slots := mulf (float64 $v.workers.maxReplicas) (float64 (include "ccoe.gpuCount" .)) }}
{{- $most := ternary $v.replicas.autoscaling.maxReplicas $v.replicas.count $v.replicas.autoscaling.enabled }}
{{- $need := mulf (float64 $most) (float64 (include "ccoe.gpuPerReplica" .)) }}
{{- if gt $need $slots }}
{{- $what := ternary "replicas.autoscaling.maxReplicas" "replicas.count" $v.replicas.autoscaling.enabled }}
{{- fail (printf "%s %d x gpu.perReplica %s needs %g GPUs; workers.maxReplicas %d x gpu.count %s gives %g" $what (int $most) (include "ccoe.gpuPerReplica" .) $need (int $v.workers.maxReplicas) (include "ccoe.gpuCount" .) $slots) }}
{{- end }}
{{- else if not (gt (float64 $v.replicas.cpus) 0.0) }}
{{- fail "replicas.cpus must be above 0 on a CPU-only install (gpu.enabled false): a replica that reserves nothing may land on the head pod, which holds no model" }}
{{- end }}
{{- if and (eq $v.artifacts.type "pvc") (eq $v.artifacts.pvc.accessMode "ReadWriteOnce") (gt (int $v.workers.maxReplicas) 1) }}
{{- fail (printf "artifacts.pvc.accessMode ReadWriteOnce cannot serve workers.maxReplicas %d worker pods and the head: use ReadWriteMany or artifacts.type objectStore" (int $v.workers.maxReplicas)) }}
{{- end }}
{{- if and (eq $v.upgradeStrategy.type "NewClusterWithIncrementalUpgrade") (not $v.ray.autoscaler.enabled) }}
{{- fail "upgradeStrategy.type NewClusterWithIncrementalUpgrade needs ray.autoscaler.enabled true (KubeRay scales the new cluster up through the Ray autoscaler)" }}
{{- end }}
{{- if eq (int $v.service.grpcPort) (int $v.service.httpPort) }}
{{- fail (printf "service.grpcPort and service.httpPort are both %d" (int $v.service.grpcPort)) }}
{{- end }}
{{- if has (int $v.metrics.port) (list (int $v.service.grpcPort) (int $v.service.httpPort) 6379 8265 10001 52365) }}
{{- fail (printf "metrics.port %d collides with a Serve or Ray port" (int $v.metrics.port)) }}
{{- end }}
{{- range $e := $v.ray.env }}
{{- if and (hasKey $e "value") (regexMatch "(?i)(password|secret|token|key)" $e.name) }}
{{- fail (printf "ray.env %s: a secret goes in as valueFrom.secretKeyRef, never as a plain value" $e.name) }}
{{- end }}
{{- end }}
{{- end }}

{{/* ---- the app config: serveConfigV2's args ------------------------------------------- */}}

{{/*
What the chart wires itself, and the value that sets it. A key here given in `app` is refused:
two places for one setting would disagree sooner or later.
*/}}
{{- define "ccoe.ownedAppKeys" -}}
backbone: model.path
rules: rules
rules_inline: rules
redis_url: redis.enabled / redis.external.url
grpc_port: service.grpcPort
http_port: service.httpPort
auth: auth.*
replica.num_replicas: replicas.count / replicas.autoscaling
replica.num_cpus: replicas.cpus
replica.num_gpus: gpu.perReplica
registry.artifact_store: artifacts.*
{{- end }}

{{- define "ccoe.appConfig" -}}
{{- $v := .Values }}
{{- $app := deepCopy ($v.app | default dict) }}
{{- range $key, $from := include "ccoe.ownedAppKeys" . | fromYaml }}
{{- $parts := splitList "." $key }}
{{- $node := $app }}
{{- range $i, $p := initial $parts }}{{ $node = (get $node $p | default dict) }}{{ end }}
{{- if and (kindIs "map" $node) (hasKey $node (last $parts)) }}
{{- fail (printf "app.%s is set by the chart from %s; remove it from app" $key $from) }}
{{- end }}
{{- end }}
{{- if and $v.otel.endpoint (kindIs "map" (get $app "telemetry")) }}
{{- range $k := list "tracing" "otlp_endpoint" }}
{{- if hasKey $app.telemetry $k }}
{{- fail (printf "app.telemetry.%s is set by the chart when otel.endpoint is set; remove one of them" $k) }}
{{- end }}
{{- end }}
{{- end }}
{{- $replica := deepCopy (get $app "replica" | default dict) }}
{{- $_ := set $replica "num_replicas" (ternary $v.replicas.autoscaling.minReplicas $v.replicas.count $v.replicas.autoscaling.enabled | int | max 1) }}
{{- $_ := set $replica "num_cpus" $v.replicas.cpus }}
{{- $_ := set $replica "num_gpus" (include "ccoe.gpuPerReplica" . | float64) }}
{{- $_ := set $app "replica" $replica }}
{{- $registry := deepCopy (get $app "registry" | default dict) }}
{{- $_ := set $registry "artifact_store" (ternary $v.artifacts.objectStore.uri $v.artifacts.mountPath (eq $v.artifacts.type "objectStore")) }}
{{- $_ := set $app "registry" $registry }}
{{- if $v.otel.endpoint }}
{{- $telemetry := deepCopy (get $app "telemetry" | default dict) }}
{{- $_ := set $telemetry "tracing" "otlp" }}
{{- $_ := set $telemetry "otlp_endpoint" $v.otel.endpoint }}
{{- $_ := set $app "telemetry" $telemetry }}
{{- end }}
{{- $_ := set $app "backbone" $v.model.path }}
{{- if $v.rules }}
{{- $_ := set $app "rules" (printf "%s/rules.yaml" (include "ccoe.configDir" .)) }}
{{- end }}
{{- $_ := set $app "redis_url" (include "ccoe.redisUrl" .) }}
{{- $_ := set $app "grpc_port" $v.service.grpcPort }}
{{- $_ := set $app "http_port" $v.service.httpPort }}
{{- if eq $v.auth.mode "token" }}
{{- $auth := dict "mode" "token" "tokens_file" (printf "%s/%s" (include "ccoe.authDir" .) $v.auth.tokensKey) }}
{{- if $v.auth.replicaToken.existingSecret }}
{{- $_ := set $auth "replica_token_file" (printf "%s/%s" (include "ccoe.replicaAuthDir" .) $v.auth.replicaToken.key) }}
{{- end }}
{{- $_ := set $app "auth" $auth }}
{{- else }}
{{- $_ := set $app "auth" (dict "mode" "none") }}
{{- end }}
{{- toYaml $app }}
{{- end }}

{{/* Ray Serve's config (serveConfigV2): the proxies' ports and the one application. */}}
{{- define "ccoe.serveConfig" -}}
{{- $v := .Values }}
{{- $app := dict "name" "ccoe" "route_prefix" "/" "import_path" "services.app:build_app" "args" (include "ccoe.appConfig" . | fromYaml) }}
{{- if $v.replicas.autoscaling.enabled }}
{{- $scaling := deepCopy $v.replicas.autoscaling.config }}
{{- $_ := set $scaling "min_replicas" (int $v.replicas.autoscaling.minReplicas) }}
{{- $_ := set $scaling "max_replicas" (int $v.replicas.autoscaling.maxReplicas) }}
{{- $_ := set $scaling "initial_replicas" (int $v.replicas.autoscaling.minReplicas) }}
{{- $_ := set $app "deployments" (list (dict "name" "ModelReplica" "num_replicas" "auto" "autoscaling_config" $scaling)) }}
{{- end }}
{{- $serve := dict
  "proxy_location" "EveryNode"
  "http_options" (dict "host" "0.0.0.0" "port" (int $v.service.httpPort))
  "grpc_options" (dict "port" (int $v.service.grpcPort) "grpc_servicer_functions" (list
      "ccoe_common.serving.grpc_servicers.add_inference_servicer"
      "ccoe_common.serving.grpc_servicers.add_registry_servicer"
      "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"))
  "applications" (list $app) }}
{{- toYaml $serve }}
{{- end }}

{{/* ---- the Ray pods: security, environment, volumes ----------------------------------- */}}

{{- define "ccoe.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurityContext.runAsUser }}
runAsGroup: {{ .Values.podSecurityContext.runAsGroup }}
fsGroup: {{ .Values.podSecurityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "ccoe.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end }}

{{- define "ccoe.rayEnv" -}}
- name: CCOE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "ccoe.redisSecretName" . }}
      key: {{ include "ccoe.redisPasswordKey" . }}
# Caches onto the writable emptyDir (the root filesystem is read-only); Triton's default is ~/.triton.
- name: XDG_CACHE_HOME
  value: /home/ray/.cache
- name: TRITON_CACHE_DIR
  value: /home/ray/.cache/triton
{{- with .Values.ray.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "ccoe.rayEnvFrom" -}}
{{- if and (eq .Values.artifacts.type "objectStore") .Values.artifacts.objectStore.existingSecret }}
envFrom:
  - secretRef:
      name: {{ .Values.artifacts.objectStore.existingSecret }}
{{- end }}
{{- end }}

{{/* (dict "root" $ "worker" true): the model volume is mounted on the workers only. */}}
{{- define "ccoe.rayVolumes" -}}
{{- $v := .root.Values }}
- name: tmp
  emptyDir: {}
- name: cache
  emptyDir: {}
- name: config
  configMap:
    name: {{ include "ccoe.suffixed" (dict "root" .root "suffix" "config") }}
{{- if eq $v.auth.mode "token" }}
- name: auth
  secret:
    secretName: {{ include "ccoe.authSecretName" .root }}
    defaultMode: 0440
    items:
      - key: {{ $v.auth.tokensKey }}
        path: {{ $v.auth.tokensKey }}
{{- if $v.auth.replicaToken.existingSecret }}
- name: replica-auth
  secret:
    secretName: {{ $v.auth.replicaToken.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ $v.auth.replicaToken.key }}
        path: {{ $v.auth.replicaToken.key }}
{{- end }}
{{- end }}
{{- if eq $v.artifacts.type "pvc" }}
- name: artifacts
  persistentVolumeClaim:
    claimName: {{ include "ccoe.artifactClaim" .root }}
{{- end }}
{{- if and .worker $v.model.volume.existingClaim }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $v.model.volume.existingClaim }}
    readOnly: true
{{- end }}
{{- end }}

{{- define "ccoe.rayVolumeMounts" -}}
{{- $v := .root.Values }}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /home/ray/.cache
- name: config
  mountPath: {{ include "ccoe.configDir" .root }}
  readOnly: true
{{- if eq $v.auth.mode "token" }}
- name: auth
  mountPath: {{ include "ccoe.authDir" .root }}
  readOnly: true
{{- if $v.auth.replicaToken.existingSecret }}
- name: replica-auth
  mountPath: {{ include "ccoe.replicaAuthDir" .root }}
  readOnly: true
{{- end }}
{{- end }}
{{- if eq $v.artifacts.type "pvc" }}
- name: artifacts
  mountPath: {{ $v.artifacts.mountPath }}
{{- end }}
{{- if and .worker $v.model.volume.existingClaim }}
- name: model
  mountPath: {{ $v.model.volume.mountPath }}
  readOnly: true
  {{- with $v.model.volume.subPath }}
  subPath: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{- define "ccoe.podAnnotations" -}}
{{- if .Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.metrics.port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}
