{{/* Name of the chart, or nameOverride. */}}
{{- define "ddl-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: fullnameOverride, else <release>-<chart> (just <release> when it already contains
the chart name). Truncated to 63 characters, the DNS label limit.
*/}}
{{- define "ddl-operator.fullname" -}}
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

{{/* Chart label value: name-version. */}}
{{- define "ddl-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "ddl-operator.labels" -}}
helm.sh/chart: {{ include "ddl-operator.chart" . }}
{{ include "ddl-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ddl-operator
{{- end }}

{{/* Labels that select the operator's pod: stable across upgrades, so no version in them. */}}
{{- define "ddl-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ddl-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The operator's ServiceAccount name. */}}
{{- define "ddl-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ddl-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The ClusterRole workers are bound to in each job namespace. */}}
{{- define "ddl-operator.workerClusterRole" -}}
{{- printf "%s-worker" (include "ddl-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Lease the operator's replicas elect their leader with. */}}
{{- define "ddl-operator.leaseName" -}}
{{- default (include "ddl-operator.fullname" .) .Values.leaderElection.leaseName | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Role (and its binding) that lets the operator hold that Lease. */}}
{{- define "ddl-operator.leaderElectionRole" -}}
{{- printf "%s-leader-election" (include "ddl-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The ValidatingAdmissionPolicy (and its binding) that keeps workers to their own pod. */}}
{{- define "ddl-operator.workerPolicy" -}}
{{- printf "%s-worker-own-pod" (include "ddl-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Operator image reference: digest wins over tag; tag defaults to appVersion. */}}
{{- define "ddl-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Rules the operator needs inside every namespace it manages (a ClusterRole bound cluster-wide
when it watches all namespaces, a Role per namespace otherwise). No access to Secrets.
*/}}
{{- define "ddl-operator.namespacedRules" -}}
- apiGroups: ["ddl-operator.dev"]
  resources: ["ddljobs"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["ddl-operator.dev"]
  resources: ["ddljobs/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["ddl-operator.dev"]
  resources: ["ddljobs/scale"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# Gives workers their identity: a ServiceAccount bound to the worker ClusterRole.
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "create"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["rolebindings"]
  verbs: ["get", "create"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["clusterroles"]
  verbs: ["bind"]
  resourceNames: [{{ include "ddl-operator.workerClusterRole" . | quote }}]
{{- end }}
