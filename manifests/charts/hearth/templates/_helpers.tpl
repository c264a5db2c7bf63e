{{/* Names */}}
{{- define "hearth.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release prefix of every object; short enough for "-controller-headless". */}}
{{- define "hearth.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "hearth.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hearth.labels" -}}
helm.sh/chart: {{ include "hearth.chart" . }}
app.kubernetes.io/name: {{ include "hearth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: hearth
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: pass (dict "ctx" $ "component" "agent"). */}}
{{- define "hearth.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hearth.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "hearth.componentLabels" -}}
{{ include "hearth.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "hearth.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}
{{- end -}}

{{- define "hearth.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create -}}
{{- default (printf "%s-agent" (include "hearth.fullname" .)) .Values.agent.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.agent.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "hearth.controller.serviceAccountName" -}}
{{- if .Values.controller.serviceAccount.create -}}
{{- default (printf "%s-controller" (include "hearth.fullname" .)) .Values.controller.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.controller.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The leader's Service: agent streams, Operator, Placement, Scaling, KEDA, extender. */}}
{{- define "hearth.controller.serviceName" -}}
{{- printf "%s-controller" (include "hearth.fullname" .) -}}
{{- end -}}

{{/* The controller Service's DNS names, shortest first. */}}
{{- define "hearth.controller.dnsNames" -}}
{{- $svc := include "hearth.controller.serviceName" . -}}
{{- $ns := .Release.Namespace -}}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) -}}
{{- toJson (concat $names .Values.tls.controller.extraDNSNames) -}}
{{- end -}}

{{/* Secret names: (dict "ctx" $ "cert" "controller"|"agent"|"operator"|...) */}}
{{- define "hearth.tls.secretName" -}}
{{- $existing := index .ctx.Values.tls.existingSecret .cert | default "" -}}
{{- if $existing -}}
{{- $existing -}}
{{- else -}}
{{- printf "%s-%s-tls" (include "hearth.fullname" .ctx) .cert -}}
{{- end -}}
{{- end -}}

{{- define "hearth.tls.useExisting" -}}
{{- if and .Values.tls.existingSecret.controller .Values.tls.existingSecret.agent -}}true{{- end -}}
{{- end -}}

{{/* Leader election as the controller will run it: the chart's defaults under the user's. */}}
{{- define "hearth.leaderElection" -}}
{{- toJson (get (fromYaml (include "hearth.controller.config" .)) "leader_election") -}}
{{- end -}}

{{/* Services select the leader pod only when the controller labels it. */}}
{{- define "hearth.selectLeader" -}}
{{- $le := fromJson (include "hearth.leaderElection" .) -}}
{{- if and $le.enabled (ne (toString $le.label_pod) "false") -}}true{{- end -}}
{{- end -}}

{{/* Where the TLS Secrets are mounted. */}}
{{- define "hearth.tlsDir" -}}/etc/hearth/tls{{- end -}}

{{/* Where the host's containerd socket directory is mounted in the agent. */}}
{{- define "hearth.containerdDir" -}}/run/containerd{{- end -}}

{{/* Where agent.images.pullSecret is mounted. */}}
{{- define "hearth.pullSecretDir" -}}/etc/hearth/pull-secret{{- end -}}

{{/* The agent config file: derived keys, then values' agent.config over them. */}}
{{- define "hearth.agent.config" -}}
{{- $tls := include "hearth.tlsDir" . -}}
{{- $svc := include "hearth.controller.serviceName" . -}}
{{- $host := printf "%s.%s.svc" $svc .Release.Namespace -}}
{{- $devices := dict "pod_resources_dir" "/var/lib/kubelet/pod-resources" -}}
{{- if eq .Values.nvml.mode "none" -}}
{{- $_ := set $devices "backend" "none" -}}
{{- else -}}
{{- $_ := set $devices "backend" "nvml" -}}
{{- end -}}
{{- if eq .Values.nvml.mode "hostPath" -}}
{{- $_ := set $devices "nvml_library" (printf "/host/nvidia/lib/%s" .Values.nvml.libraryName) -}}
{{- end -}}
{{- $im := deepCopy .Values.agent.images -}}
{{- $images := dict
  "containerd_socket" (printf "%s/containerd.sock" (include "hearth.containerdDir" .))
  "keep" $im.keep
  "insecure_registries" $im.insecureRegistries
  "connections" (int $im.connections)
  "chunk_size" $im.chunkSize
  "check_interval" $im.checkInterval
  "release_after" $im.releaseAfter
  "mirror" $im.mirror
-}}
{{- if $im.mirror -}}
{{- /* Mounted at the same path, so it matches containerd's config_path; the agent listens on the pod's addresses and tells containerd its POD_IP. */ -}}
{{- $_ := set $images "hosts_dir" .Values.containerd.hostsDir -}}
{{- $_ := set $images "mirror_listen" "0.0.0.0:0" -}}
{{- end -}}
{{- if $im.pullSecret -}}
{{- $_ := set $images "auth_file" (printf "%s/.dockerconfigjson" (include "hearth.pullSecretDir" .)) -}}
{{- end -}}
{{- /* Without the socket mount: off, saying so, rather than looking for a socket that is not there. */ -}}
{{- if not .Values.containerd.enabled -}}
{{- $_ := set $images "enabled" false -}}
{{- end -}}
{{- $derived := dict
  "http_listen" (printf "0.0.0.0:%d" (int .Values.agent.port))
  "controller" (dict
    "url" (printf "https://%s:%d" $host (int .Values.controller.ports.grpc))
    "server_name" $host
    "tls" (dict "ca" (printf "%s/ca.crt" $tls) "cert" (printf "%s/tls.crt" $tls) "key" (printf "%s/tls.key" $tls)))
  "devices" $devices
  "state_dir" "/var/lib/hearth"
  "cache" (dict "root" "/var/lib/hearth/cache")
  "runtimes" (dict "pod" (dict
    "namespace" .Release.Namespace
    "host_cache_dir" (printf "%s/cache" (trimSuffix "/" .Values.cache.hostPath))))
  "images" $images
-}}
{{- toYaml (mergeOverwrite $derived (deepCopy .Values.agent.config)) -}}
{{- end -}}

{{/* The controller config file: derived keys, then values' controller.config over them. */}}
{{- define "hearth.controller.config" -}}
{{- $tls := include "hearth.tlsDir" . -}}
{{- $c := .Values.tls.clients -}}
{{- $auth := dict -}}
{{- if $c.scheduler.enabled }}{{ $_ := set $auth "schedulers" (list $c.scheduler.identity) }}{{ end -}}
{{- if $c.autoscaler.enabled }}{{ $_ := set $auth "autoscalers" (list $c.autoscaler.identity) }}{{ end -}}
{{- if $c.operator.enabled }}{{ $_ := set $auth "operators" (list $c.operator.identity) }}{{ end -}}
{{- /* Every agent shares one certificate: its identity may report as any node. */ -}}
{{- $_ := set $auth "fleet_agents" (list (first .Values.tls.agent.dnsNames)) -}}
{{- $extenderListen := "" -}}
{{- if .Values.controller.extender.enabled -}}
{{- $extenderListen = printf "0.0.0.0:%d" (int .Values.controller.ports.extender) -}}
{{- end -}}
{{- $derived := dict
  "listen" (printf "0.0.0.0:%d" (int .Values.controller.ports.grpc))
  "http_listen" (printf "0.0.0.0:%d" (int .Values.controller.ports.metrics))
  "tls" (dict "ca" (printf "%s/ca.crt" $tls) "cert" (printf "%s/tls.crt" $tls) "key" (printf "%s/tls.key" $tls))
  "extender" (dict "listen" $extenderListen "prefix" .Values.controller.extender.prefix)
  "leader_election" (dict "lease_name" (printf "%s-controller" (include "hearth.fullname" .)))
-}}
{{- if $auth -}}
{{- $_ := set $derived "auth" $auth -}}
{{- end -}}
{{- toYaml (mergeOverwrite $derived (deepCopy .Values.controller.config)) -}}
{{- end -}}
