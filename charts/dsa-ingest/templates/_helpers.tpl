{{/* The chart's name, overridable with nameOverride. */}}
{{- define "dsa-ingest.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object's name: the release name, plus the chart's unless it contains it. */}}
{{- define "dsa-ingest.fullname" -}}
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

{{/*
The name of an object that adds a suffix to the prefix: the prefix is cut so that the
whole stays within the 63 characters a Kubernetes name (and label value) allows.
Called with a dict of the root context ("root") and the suffix ("suffix").
*/}}
{{- define "dsa-ingest.componentName" -}}
{{- $room := sub 62 (len .suffix) | int -}}
{{- printf "%s-%s" (include "dsa-ingest.fullname" .root | trunc $room | trimSuffix "-") .suffix -}}
{{- end -}}

{{/* The ServiceAccount the long-running pods use. */}}
{{- define "dsa-ingest.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dsa-ingest.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
Bytes the spool may need: IMPORT_MAX_FILE_SIZE (each worker may spool one spreadsheet
that large) times IMPORT_PARALLEL_WORKERS, plus tmpVolume.headroomBytes. Used for the
consumers' ephemeral-storage request, the /tmp volume's size limit and the spool alert.
*/}}
{{- define "dsa-ingest.spoolBytes" -}}
{{- $fileSize := default "5368709120" .Values.config.IMPORT_MAX_FILE_SIZE | int64 -}}
{{- $workers := default "4" .Values.config.IMPORT_PARALLEL_WORKERS | int64 -}}
{{- add (mul $fileSize $workers) (.Values.tmpVolume.headroomBytes | int64) -}}
{{- end -}}

{{/* The /tmp volume's size limit: tmpVolume.sizeLimit, or the spool's need in MiB. */}}
{{- define "dsa-ingest.spoolSizeLimit" -}}
{{- if .Values.tmpVolume.sizeLimit -}}
{{- .Values.tmpVolume.sizeLimit -}}
{{- else -}}
{{- printf "%dMi" (div (add (include "dsa-ingest.spoolBytes" . | int64) 1048575) 1048576) -}}
{{- end -}}
{{- end -}}

{{/* Labels that select the release's pods; the caller adds the component. */}}
{{- define "dsa-ingest.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dsa-ingest.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "dsa-ingest.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "dsa-ingest.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "dsa-ingest.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "dsa-ingest.secretName" -}}
{{- required "existingSecret must name a Secret with DATABASE_URL and AMQP_URL" .Values.existingSecret -}}
{{- end -}}

{{/* SHUTDOWN_GRACE_SECONDS plus 15 unless terminationGracePeriodSeconds is set. */}}
{{- define "dsa-ingest.terminationGracePeriodSeconds" -}}
{{- if .Values.terminationGracePeriodSeconds -}}
{{- .Values.terminationGracePeriodSeconds -}}
{{- else -}}
{{- add (default "30" .Values.config.SHUTDOWN_GRACE_SECONDS | int) 15 -}}
{{- end -}}
{{- end -}}

{{/*
The container of `consume`, `maintain` and `watch`: image, settings, probes and the
writable /tmp. Called with a dict of the root context ("root"), the subcommand
("command") and the component's values ("component"), and optionally "env" (extra
variables) and "volumeMounts" (extra mounts).
*/}}
{{- define "dsa-ingest.container" -}}
{{- $root := .root -}}
- name: {{ .command }}
  image: {{ include "dsa-ingest.image" $root }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  args: [{{ .command | quote }}]
  envFrom:
    - configMapRef:
        name: {{ include "dsa-ingest.fullname" $root }}
    - secretRef:
        name: {{ include "dsa-ingest.secretName" $root }}
  {{- with .env }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  ports:
    - name: metrics
      containerPort: {{ $root.Values.metricsPort }}
      protocol: TCP
  livenessProbe:
    httpGet:
      path: /healthz
      port: metrics
    {{- toYaml $root.Values.livenessProbe | nindent 4 }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: metrics
    {{- toYaml $root.Values.readinessProbe | nindent 4 }}
  resources:
    {{- $resources := deepCopy .component.resources }}
    {{- if .spool }}
    {{- /* Room for the spool, so the scheduler puts the pod where it fits. */}}
    {{- $requests := $resources.requests | default dict }}
    {{- if not (hasKey $requests "ephemeral-storage") }}
    {{- $_ := set $requests "ephemeral-storage" (include "dsa-ingest.spoolSizeLimit" $root) }}
    {{- end }}
    {{- $_ := set $resources "requests" $requests }}
    {{- end }}
    {{- toYaml $resources | nindent 4 }}
  securityContext:
    {{- toYaml $root.Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    {{- with .volumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/*
The scratch volume behind /tmp, where IMPORT_SPOOL_DIR is by default. Its size limit is
tmpVolume.sizeLimit or derived (see dsa-ingest.spoolBytes); the kubelet evicts a pod
that writes more.
*/}}
{{- define "dsa-ingest.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ include "dsa-ingest.spoolSizeLimit" . | quote }}
{{- end -}}
