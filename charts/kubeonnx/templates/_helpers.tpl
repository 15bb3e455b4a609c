{{- define "kubeonnx.labels" -}}
app.kubernetes.io/name: kubeonnx-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
{{- define "kubeonnx.selector" -}}
app.kubernetes.io/name: kubeonnx-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
