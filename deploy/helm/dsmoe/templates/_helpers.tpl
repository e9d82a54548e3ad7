{{/* Names and labels. */}}
{{- define "dsmoe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dsmoe.fullname" -}}
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

{{- define "dsmoe.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "dsmoe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dsmoe
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "gateway"). */}}
{{- define "dsmoe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dsmoe.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "dsmoe.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "dsmoe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dsmoe.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The served model name / `model` metrics label: model.name, else model.path's last component. */}}
{{- define "dsmoe.modelName" -}}
{{- default (base (trimSuffix "/" .Values.model.path)) .Values.model.name -}}
{{- end -}}

{{/* Comma-separated gRPC addresses of the pods of a StatefulSet behind its headless Service. */}}
{{- define "dsmoe.podAddresses" -}}
{{- $root := .root -}}
{{- $svc := printf "%s-%s" (include "dsmoe.fullname" $root) .component -}}
{{- $out := list -}}
{{- range $i := until (int .replicas) -}}
{{- $out = append $out (printf "%s-%d.%s.%s.svc.%s:%d" $svc $i $svc $root.Release.Namespace $root.Values.clusterDomain (int $.port)) -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}

{{/*
The placement (router/placement.h's JSON): for each MoE layer, per routed expert, the expert
servers holding it. Round-robin as `dsmoe cluster up` computes it: expert e of the i-th MoE
layer on servers (e + i + r) mod S for r < copies. Layer l is MoE iff l >= first_k_dense_replace
and l % moe_layer_freq == 0 (Hugging Face's rule).
*/}}
{{- define "dsmoe.placement" -}}
{{- if .Values.experts.placement.json -}}
{{- .Values.experts.placement.json -}}
{{- else -}}
{{- $a := .Values.model.architecture -}}
{{- $servers := int .Values.experts.replicas -}}
{{- $copies := int .Values.experts.placement.copies -}}
{{- if gt $copies $servers -}}
{{- fail (printf "experts.placement.copies (%d) must not exceed experts.replicas (%d): one copy per server at most" $copies $servers) -}}
{{- end -}}
{{- $layers := list -}}
{{- $moe := 0 -}}
{{- range $l := until (int $a.numHiddenLayers) -}}
{{- if and (ge $l (int $a.firstKDenseReplace)) (eq (mod $l (int $a.moeLayerFreq)) 0) -}}
{{- $experts := list -}}
{{- range $e := until (int $a.nRoutedExperts) -}}
{{- $holders := list -}}
{{- range $r := until $copies -}}
{{- $holders = append $holders (mod (add $e $moe $r) $servers) -}}
{{- end -}}
{{- $experts = append $experts $holders -}}
{{- end -}}
{{- $layers = append $layers (dict "layer" $l "servers" $experts) -}}
{{- $moe = add1 $moe -}}
{{- end -}}
{{- end -}}
{{- dict "num_servers" $servers "layers" $layers | toJson -}}
{{- end -}}
{{- end -}}

{{/* The whole CPUs of a Kubernetes CPU quantity ("4", 4, "3500m", "0.5"), rounded down as the
servers round the cgroup quota down (core/util/cpu_quota.h). */}}
{{- define "dsmoe.wholeCpus" -}}
{{- $q := toString . -}}
{{- if hasSuffix "m" $q -}}
{{- div (atoi (trimSuffix "m" $q)) 1000 -}}
{{- else -}}
{{- floor (float64 $q) | int -}}
{{- end -}}
{{- end -}}

{{/* A component's --threads, if set: refused above its CPU limit (threads beyond the quota are
throttled every period). 0 (unset) lets the server follow the limit itself.
(dict "c" .Values.attention "name" "attention") */}}
{{- define "dsmoe.threadsArg" -}}
{{- $threads := int .c.threads -}}
{{- if gt $threads 0 -}}
{{- $limits := default dict (default dict .c.resources).limits -}}
{{- if hasKey $limits "cpu" -}}
{{- $cpus := max 1 (int (include "dsmoe.wholeCpus" $limits.cpu)) -}}
{{- if gt $threads $cpus -}}
{{- fail (printf "%s.threads=%d exceeds %s.resources.limits.cpu=%v (%d whole CPUs): threads beyond the quota are throttled every period; leave threads at 0 to follow the limit" .name $threads .name $limits.cpu $cpus) -}}
{{- end -}}
{{- end -}}
- --threads={{ $threads }}
{{- end -}}
{{- end -}}

{{/* Resources of a component, with its GPU request added when enabled: (dict "c" .Values.attention). */}}
{{- define "dsmoe.resources" -}}
{{- $res := deepCopy (default dict .c.resources) -}}
{{- if .c.gpu.enabled -}}
{{- $limits := deepCopy (default dict $res.limits) -}}
{{- $_ := set $limits .c.gpu.resourceName (int .c.gpu.count) -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* The model volume. */}}
{{- define "dsmoe.modelVolume" -}}
- name: model
{{- if eq .Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: {{ .Values.model.pvc.readOnly }}
{{- else if eq .Values.model.source "hostPath" }}
  hostPath:
    path: {{ .Values.model.hostPath.path }}
    type: {{ .Values.model.hostPath.type }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.model.download.sizeLimit }}
{{- end }}
{{- end -}}

{{/* The init container that downloads the model (model.source = download). */}}
{{- define "dsmoe.modelInitContainers" -}}
{{- $root := .root -}}
{{- if eq $root.Values.model.source "download" }}
initContainers:
  - name: download-model
    image: {{ $root.Values.model.download.image }}
    command: {{- toYaml $root.Values.model.download.command | nindent 6 }}
    env:
      - name: MODEL_DIR
        value: {{ $root.Values.model.path | quote }}
      # What this pod reads of the checkpoint, as file patterns for the command to fetch: the
      # gateway only the config and tokenizer files; servers everything (routed experts share
      # safetensors shards with the other tensors).
      - name: DSMOE_ROLE
        value: {{ .component }}
      - name: DSMOE_MODEL_FILES
        value: {{ ternary "config.json generation_config.json tokenizer.json tokenizer_config.json" "*" (eq .component "gateway") | quote }}
      {{- with $root.Values.model.download.env }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    volumeMounts:
      - name: model
        mountPath: {{ $root.Values.model.mountPath }}
{{- end }}
{{- end -}}

{{/*
gRPC health probes on the plain-text health port (tls.healthPort):
(dict "root" $ "port" P "service" "dsmoe.v1.Gateway"). Readiness asks for the overall status
(""), which means "can serve": an attention server reports SERVING only while every routed
expert has a live expert server, the gateway while at least one attention server is ready.
Startup and liveness ask for the process's own gRPC service, SERVING from start-up to
shutdown, so a pod waiting for its dependencies is not restarted.
*/}}
{{- define "dsmoe.probes" -}}
startupProbe:
  grpc:
    port: {{ .port }}
    service: {{ .service }}
  periodSeconds: {{ .root.Values.probes.startup.periodSeconds }}
  failureThreshold: {{ .root.Values.probes.startup.failureThreshold }}
readinessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: {{ .root.Values.probes.readiness.periodSeconds }}
  failureThreshold: {{ .root.Values.probes.readiness.failureThreshold }}
livenessProbe:
  grpc:
    port: {{ .port }}
    service: {{ .service }}
  periodSeconds: {{ .root.Values.probes.liveness.periodSeconds }}
  failureThreshold: {{ .root.Values.probes.liveness.failureThreshold }}
{{- end -}}

{{/* Pod-level settings shared by every component: (dict "root" $ "c" .Values.gateway). */}}
{{- define "dsmoe.podCommon" -}}
serviceAccountName: {{ include "dsmoe.serviceAccountName" .root }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- with .c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
