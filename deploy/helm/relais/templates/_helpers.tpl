{{/* Names: every object is "<release>-relais-<part>" unless the release name already holds the chart's name. */}}
{{- define "relais.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "relais.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component (a service, or "migrate"); call with (dict "root" $ "component" NAME). */}}
{{- define "relais.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "relais.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "relais.directoryConfigMap" -}}
{{- if .Values.directory.existingConfigMap -}}
{{- .Values.directory.existingConfigMap -}}
{{- else -}}
{{- printf "%s-directory" (include "relais.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* RELAIS_PUBLIC_URL of a service's pages: publicUrl.<service>, else https://<its ingress host>. */}}
{{- define "relais.publicUrl" -}}
{{- $root := .root -}}
{{- $url := index $root.Values.publicUrl .service -}}
{{- if and (not $url) $root.Values.ingress.enabled -}}
{{- $url = printf "%s://%s" $root.Values.ingress.scheme (index $root.Values.ingress.hosts .service) -}}
{{- end -}}
{{- required (printf "publicUrl.%s: the address people open %s's pages at (or enable the ingress and set ingress.hosts.%s)" .service .service .service) $url -}}
{{- end -}}

{{/* An env entry read from the release's Secret; call with (dict "root" $ "name" VAR "key" KEY ["optional" true]). */}}
{{- define "relais.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .root.Values.secret.name }}
      key: {{ .key }}
      {{- if .optional }}
      optional: true
      {{- end }}
{{- end -}}

{{/* Environment shared by a service's pods and its migration Job. */}}
{{- define "relais.databaseEnv" -}}
{{- $key := index .root.Values.secret.keys (printf "%sDatabaseUrl" .service) -}}
{{- include "relais.secretEnv" (dict "root" .root "name" (printf "RELAIS_%s_DATABASE_URL" (upper .service)) "key" $key) }}
{{- end -}}

{{- define "relais.redisEnv" -}}
{{- $v := .Values -}}
- name: RELAIS_NAMESPACE
  value: {{ $v.redisNamespace | quote }}
{{- if $v.redis.sentinel.enabled }}
- name: RELAIS_REDIS_SENTINELS
  value: {{ required "redis.sentinel.hosts: the Sentinels, as host:port" (join "," $v.redis.sentinel.hosts) | quote }}
- name: RELAIS_REDIS_SENTINEL_MASTER
  value: {{ $v.redis.sentinel.master | quote }}
{{ include "relais.secretEnv" (dict "root" . "name" "RELAIS_REDIS_PASSWORD" "key" $v.secret.keys.redisPassword "optional" true) }}
{{- else }}
{{ include "relais.secretEnv" (dict "root" . "name" "RELAIS_REDIS_URL" "key" $v.secret.keys.redisUrl) }}
{{- end }}
{{- end -}}

{{- define "relais.podSecurity" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end -}}

{{- define "relais.scratchVolumes" -}}
- name: data
  emptyDir:
    sizeLimit: {{ .Values.dataSizeLimit }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end -}}

{{- define "relais.scratchMounts" -}}
- name: data
  mountPath: /data
- name: tmp
  mountPath: /tmp
{{- end -}}
