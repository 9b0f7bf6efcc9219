{{/* Names: <release>-dicom-node-<part>, cut to the 63 characters Kubernetes allows. */}}
{{- define "dicom-node.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dicom-node.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "dicom-node.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dicom-node.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "dicom-node.fullname" .)) -}}
{{- end -}}

{{- define "dicom-node.brokerUrl" -}}
{{- if .Values.brokerUrl -}}
{{- .Values.brokerUrl -}}
{{- else if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "dicom-node.fullname" .) -}}
{{- else -}}
{{- fail "brokerUrl is required when redis.enabled is false" -}}
{{- end -}}
{{- end -}}

{{- define "dicom-node.databaseUrl" -}}
{{- if .Values.secrets.databaseUrl -}}
{{- .Values.secrets.databaseUrl -}}
{{- else if .Values.postgresql.enabled -}}
{{- $password := required "postgresql.password is required when postgresql.enabled is true" .Values.postgresql.password -}}
{{- printf "postgresql+psycopg://dicom_node:%s@%s-postgresql:5432/dicom_node" $password (include "dicom-node.fullname" .) -}}
{{- else -}}
{{- fail "secrets.databaseUrl (or secrets.existingSecret) is required when postgresql.enabled is false" -}}
{{- end -}}
{{- end -}}

{{/* The workers run once they have a token to reach the node with. */}}
{{- define "dicom-node.workersEnabled" -}}
{{- if and (gt (int .Values.worker.replicas) 0) (or .Values.secrets.existingSecret .Values.secrets.workerToken) -}}true{{- end -}}
{{- end -}}

{{/* The container security context both images run with: uid 10001, nothing more. */}}
{{- define "dicom-node.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
