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

{{/* Cluster-scoped objects are named after the release and its namespace, so that two
releases of the chart (in two namespaces) never share or overwrite one. */}}
{{- define "kubeonnx.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* What the operator does to the objects it watches and makes (ClusterRole, or a Role in
each watched namespace). Every verb here is used: apply is a patch; nothing is updated. */}}
{{- define "kubeonnx.rules" -}}
# The watches only: a model or policy is never fetched by name.
- apiGroups: [kubeonnx.io]
  resources: [inferencemodels, quotapolicies]
  verbs: [list, watch]
- apiGroups: [kubeonnx.io]
  resources: [inferencemodels/status, quotapolicies/status]
  verbs: [patch]
# Children carry ownerReferences with blockOwnerDeletion, which needs update on finalizers.
- apiGroups: [kubeonnx.io]
  resources: [inferencemodels/finalizers]
  verbs: [update]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [keda.sh]
  resources: [scaledobjects]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [monitoring.coreos.com]
  resources: [podmonitors]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [networking.k8s.io]
  resources: [ingresses]
  verbs: [get, list, watch, create, patch, delete]
# spec.ingress.gateway: the model's HTTPRoute; its parent Gateways and their class are
# read by name (status.supportedFeatures: may the route mirror?), never listed or watched.
# GatewayClasses are cluster-scoped: with watchNamespaces (Roles only) none can be read,
# and mirroring through a Gateway stays off (condition GatewayMirror says so).
- apiGroups: [gateway.networking.k8s.io]
  resources: [httproutes]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [gateway.networking.k8s.io]
  resources: [gateways, gatewayclasses]
  verbs: [get]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# The runtime's quota file (limits, where the keys are mounted; no key).
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch, create, patch, delete]
# Whether a tenant's API key Secret exists, asked by name for its metadata only: the kubelet
# mounts the keys into the model's pods, and the operator neither lists, watches, writes nor
# reads the data of any Secret.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}
