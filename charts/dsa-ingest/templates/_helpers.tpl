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
    {{- toYaml .component.resources | nindent 4 }}
  securityContext:
    {{- toYaml $root.Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    {{- with .volumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* The scratch volume behind /tmp. */}}
{{- define "dsa-ingest.tmpVolume" -}}
- name: tmp
  emptyDir: {{ with .Values.tmpVolume.sizeLimit }}{sizeLimit: {{ . | quote }}}{{ else }}{}{{ end }}
{{- end -}}
