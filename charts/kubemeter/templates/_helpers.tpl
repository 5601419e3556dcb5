{{/* Names and labels shared by every template. */}}

{{- define "kubemeter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubemeter.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "kubemeter.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "kubemeter.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubemeter.operatorName" -}}
{{- printf "%s-operator" (include "kubemeter.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubemeter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubemeter.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubemeter.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "kubemeter.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "kubemeter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kubemeter
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kubemeter.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "kubemeter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* The peering the operator joins; must match PEERING_NAME in kubemeter_operator/main.py. */}}
{{- define "kubemeter.peeringName" -}}kubemeter{{- end -}}
