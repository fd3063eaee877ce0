{{/* Names, labels and the pieces every component shares. */}}

{{- define "ig.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ig.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "ig.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "ig.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The name of one component's objects: ig.component (dict "root" $ "component" "worker") */}}
{{- define "ig.component" -}}
{{- printf "%s-%s" (include "ig.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ig.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ig.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ig.labels" -}}
{{ include "ig.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: {{ include "ig.name" .root }}
{{- end -}}

{{/* The pods that mount the shared volumes (job outputs, spool): with ReadWriteOnce they run together. */}}
{{- define "ig.storageLabel" -}}
inference-gateway/shared-volumes: {{ .Release.Name | quote }}
{{- end -}}

{{- define "ig.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The host a component is reached at: its Service, or podman's pod name (<deployment>-pod-0). */}}
{{- define "ig.host" -}}
{{- if .root.Values.podman.enabled -}}
{{- printf "%s-pod-0" (include "ig.component" .) -}}
{{- else -}}
{{- include "ig.component" . -}}
{{- end -}}
{{- end -}}

{{- define "ig.redisScheme" -}}
{{- if .Values.tls.redis.enabled }}rediss{{ else }}redis{{ end -}}
{{- end -}}

{{/* Hard time limit of a job (inference.jobs.celery_backend.hard_time_limit) */}}
{{- define "ig.hardTimeLimit" -}}
{{- $limit := int .Values.jobs.timeLimit -}}
{{- add $limit (min 30 (max 1 (div $limit 10))) -}}
{{- end -}}

{{/* The broker URL's environment: from the chart's Redis password, or the external URL's Secret. */}}
{{- define "ig.brokerEnv" -}}
{{- if .Values.redis.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.auth.existingSecret }}
      key: {{ .Values.redis.auth.key }}
{{- if .Values.podman.enabled }}
{{- /* podman 4.3 expands no $(VAR): the whole URL from the same Secret (tests/kube/run.sh creates it) */}}
- name: INFERENCE_BROKER_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.auth.existingSecret }}
      key: {{ .Values.redis.auth.podmanUrlKey }}
{{- else }}
- name: INFERENCE_BROKER_URL
  value: {{ printf "%s://:$(REDIS_PASSWORD)@%s:%d/0" (include "ig.redisScheme" .) (include "ig.host" (dict "root" . "component" "redis")) (int .Values.redis.port) | quote }}
{{- end }}
{{- else }}
- name: INFERENCE_BROKER_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalRedis.urlSecret.name }}
      key: {{ .Values.externalRedis.urlSecret.key }}
{{- end }}
{{- end -}}

{{/* TLS settings (issue 39) pointing at the mounted Secrets: ig.tlsEnv (dict "root" $ "parts" (list "gateway" "redis")) */}}
{{- define "ig.tlsEnv" -}}
{{- $tls := .root.Values.tls -}}
{{- if and (has "gateway" .parts) $tls.gateway.enabled }}
- name: INFERENCE_TLS_CERT
  value: /etc/hippoai/tls/gateway/tls.crt
- name: INFERENCE_TLS_KEY
  value: /etc/hippoai/tls/gateway/tls.key
{{- if $tls.gateway.clientCASecret }}
- name: INFERENCE_TLS_CLIENT_CA
  value: /etc/hippoai/tls/gateway-client-ca/ca.crt
{{- end }}
{{- end }}
{{- if and (has "dicom" .parts) $tls.dicom.enabled }}
- name: INFERENCE_PACS_TLS_CERT
  value: /etc/hippoai/tls/dicom/tls.crt
- name: INFERENCE_PACS_TLS_KEY
  value: /etc/hippoai/tls/dicom/tls.key
- name: INFERENCE_PACS_TLS_CA
  value: /etc/hippoai/tls/dicom-ca/ca.crt
{{- end }}
{{- if and (has "redis" .parts) $tls.redis.enabled }}
- name: INFERENCE_REDIS_TLS_CERT
  value: /etc/hippoai/tls/redis/tls.crt
- name: INFERENCE_REDIS_TLS_KEY
  value: /etc/hippoai/tls/redis/tls.key
- name: INFERENCE_REDIS_TLS_CA
  value: /etc/hippoai/tls/redis-ca/ca.crt
{{- end }}
{{- end -}}

{{/* The Secret volumes of those settings: ig.tlsVolumes (dict "root" $ "parts" (list ...)) and ig.tlsMounts */}}
{{- define "ig.tlsSecrets" -}}
{{- $tls := .root.Values.tls -}}
{{- $secrets := dict -}}
{{- if and (has "gateway" .parts) $tls.gateway.enabled -}}
{{- $_ := set $secrets "gateway" $tls.gateway.secret -}}
{{- if $tls.gateway.clientCASecret }}{{ $_ := set $secrets "gateway-client-ca" $tls.gateway.clientCASecret }}{{ end -}}
{{- end -}}
{{- if and (has "dicom" .parts) $tls.dicom.enabled -}}
{{- $_ := set $secrets "dicom" $tls.dicom.secret -}}
{{- $_ := set $secrets "dicom-ca" $tls.dicom.caSecret -}}
{{- end -}}
{{- if and (has "redis" .parts) $tls.redis.enabled -}}
{{- $_ := set $secrets "redis" $tls.redis.secret -}}
{{- $_ := set $secrets "redis-ca" $tls.redis.caSecret -}}
{{- end -}}
{{- toJson $secrets -}}
{{- end -}}

{{- define "ig.tlsVolumes" -}}
{{- range $name, $secret := include "ig.tlsSecrets" . | fromJson }}
- name: tls-{{ $name }}
  secret:
    secretName: {{ $secret }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "ig.tlsMounts" -}}
{{- range $name, $secret := include "ig.tlsSecrets" . | fromJson }}
- name: tls-{{ $name }}
  mountPath: /etc/hippoai/tls/{{ $name }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* The name of a pod-local volume (emptyDir): podman 4.3 makes it a volume named so on the host, shared by
     every pod that names it alike, so there it carries the release's name. */}}
{{- define "ig.localVolume" -}}
{{- if .root.Values.podman.enabled }}{{ include "ig.component" . }}{{ else }}{{ .component }}{{ end -}}
{{- end -}}

{{/* The shared volumes: job outputs, the node's spool, the data root; and /tmp and the model cache. */}}
{{- define "ig.sharedVolumes" -}}
- name: jobs
  persistentVolumeClaim:
    claimName: {{ default (include "ig.component" (dict "root" . "component" "jobs")) .Values.storage.jobs.existingClaim }}
- name: spool
  persistentVolumeClaim:
    claimName: {{ default (include "ig.component" (dict "root" . "component" "spool")) .Values.storage.spool.existingClaim }}
- name: {{ include "ig.localVolume" (dict "root" . "component" "data") }}
{{- if .Values.storage.data.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.storage.data.existingClaim }}
    readOnly: true
{{- else }}
  emptyDir:
    sizeLimit: 1Mi
{{- end }}
- name: {{ include "ig.localVolume" (dict "root" . "component" "tmp") }}
  emptyDir:
    sizeLimit: 4Gi
- name: {{ include "ig.localVolume" (dict "root" . "component" "model-cache") }}
  emptyDir:
    sizeLimit: 1Gi
- name: model-manifest
  configMap:
    name: {{ include "ig.component" (dict "root" . "component" "model-manifest") }}
{{- end -}}

{{/* Mounts of those volumes; the spool read-only except in the node (ig.sharedMounts (dict "root" $ "spoolWritable" true)) */}}
{{- define "ig.sharedMounts" -}}
- name: jobs
  mountPath: /var/lib/inference/jobs
- name: spool
  mountPath: /var/lib/inference/pacs
  readOnly: {{ not .spoolWritable }}
- name: {{ include "ig.localVolume" (dict "root" .root "component" "data") }}
  mountPath: /data
  readOnly: true
- name: {{ include "ig.localVolume" (dict "root" .root "component" "tmp") }}
  mountPath: /tmp
- name: {{ include "ig.localVolume" (dict "root" .root "component" "model-cache") }}
  mountPath: /var/lib/inference/model-cache
- name: model-manifest
  mountPath: /etc/hippoai/models
  readOnly: true
{{- end -}}

{{/* Pod and container security: uid 10001 (the image's user), no privilege escalation, no capabilities. */}}
{{- define "ig.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid | default 10001 }}
runAsGroup: {{ .uid | default 10001 }}
fsGroup: {{ .uid | default 10001 }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "ig.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Scheduling: the component's nodeSelector, tolerations and affinity, the GPU's, and with ReadWriteOnce
     storage the pod affinity that keeps every pod mounting the shared volumes on one node. */}}
{{- define "ig.scheduling" -}}
{{- $root := .root -}}
{{- $gpu := and $root.Values.gpu.enabled .gpu -}}
{{- $nodeSelector := merge (dict) (.values.nodeSelector | default dict) (ternary $root.Values.gpu.nodeSelector dict $gpu) -}}
{{- if $nodeSelector }}
nodeSelector:
  {{- toYaml $nodeSelector | nindent 2 }}
{{- end }}
{{- $tolerations := concat (.values.tolerations | default list) (ternary $root.Values.gpu.tolerations list $gpu) -}}
{{- if $tolerations }}
tolerations:
  {{- toYaml $tolerations | nindent 2 }}
{{- end }}
{{- if and .shared (eq $root.Values.storage.accessMode "ReadWriteOnce") }}
affinity:
  podAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      - topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "ig.storageLabel" $root | nindent 12 }}
{{- else if .values.affinity }}
affinity:
  {{- toYaml .values.affinity | nindent 2 }}
{{- end }}
{{- end -}}
