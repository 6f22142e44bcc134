{{/*
Expand the name of the chart.
*/}}
{{- define "courseview.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "courseview.fullname" -}}
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

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "courseview.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "courseview.labels" -}}
helm.sh/chart: {{ include "courseview.chart" . }}
{{ include "courseview.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: courseview
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "courseview.selectorLabels" -}}
app.kubernetes.io/name: {{ include "courseview.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Selector labels of one component: (dict "root" $ "component" "worker" "projection" "catalog").
"projection" is optional.
*/}}
{{- define "courseview.componentSelectorLabels" -}}
{{ include "courseview.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- if .projection }}
courseview/projection: {{ .projection }}
{{- end }}
{{- end }}

{{/*
Labels of one component's objects: (dict "root" $ "component" "worker" "projection" "catalog").
*/}}
{{- define "courseview.componentLabels" -}}
{{ include "courseview.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- if .projection }}
courseview/projection: {{ .projection }}
{{- end }}
{{- end }}

{{/*
The name of the service account to use.
*/}}
{{- define "courseview.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "courseview.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference.
*/}}
{{- define "courseview.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (toString (default .Chart.AppVersion .Values.image.tag)) }}
{{- end }}
{{- end }}

{{/*
A name made of the fullname and a suffix, within 63 characters: the fullname
is shortened, never the suffix (which tells the objects apart).
(dict "root" $ "suffix" "api")
*/}}
{{- define "courseview.suffixedName" -}}
{{- $room := int (sub 62 (len .suffix)) }}
{{- printf "%s-%s" (include "courseview.fullname" .root | trunc $room | trimSuffix "-") .suffix }}
{{- end }}

{{/*
Names of the objects.
*/}}
{{- define "courseview.configMapName" -}}
{{- include "courseview.suffixedName" (dict "root" . "suffix" "config") }}
{{- end }}

{{- define "courseview.apiName" -}}
{{- include "courseview.suffixedName" (dict "root" . "suffix" "api") }}
{{- end }}

{{- define "courseview.producerName" -}}
{{- include "courseview.suffixedName" (dict "root" . "suffix" "producer") }}
{{- end }}

{{/*
A worker's name: (dict "root" $ "projection" "teacher_courses") -> <fullname>-worker-teacher-courses.
*/}}
{{- define "courseview.workerName" -}}
{{- include "courseview.suffixedName" (dict "root" .root "suffix" (printf "worker-%s" (.projection | replace "_" "-"))) }}
{{- end }}

{{/*
The projections courseview knows, in a stable order.
*/}}
{{- define "courseview.projections" -}}
catalog teacher_courses
{{- end }}

{{/*
A worker's Kafka consumer group: (dict "root" $ "projection" "catalog").
*/}}
{{- define "courseview.consumerGroup" -}}
{{- printf "%s.%s" .root.Values.kafka.groupPrefix .projection }}
{{- end }}

{{/*
The bounds an autoscaler gives a worker: (dict "root" $ "projection" "catalog").
Renders YAML {min, max}; read it with fromYaml. The projection's own
workers.<p>.autoscaling.minReplicas / maxReplicas win when set (> 0), then
the active autoscaler's (autoscaling.keda.minReplicaCount / maxReplicaCount,
autoscaling.hpa.minReplicas / maxReplicas), then the partition count for the
maximum. Fails when partitions is unset or the maximum exceeds it.
*/}}
{{- define "courseview.workerReplicaBounds" -}}
{{- $v := .root.Values }}
{{- $w := index $v.workers .projection }}
{{- $partitions := int $w.partitions }}
{{- if le $partitions 0 }}
{{- fail (printf "workers.%s.partitions must be set (the partition count of the course topics) when worker autoscaling is enabled: it bounds the replicas" .projection) }}
{{- end }}
{{- $globalMin := int $v.autoscaling.hpa.minReplicas }}
{{- $globalMax := int $v.autoscaling.hpa.maxReplicas }}
{{- $source := "autoscaling.hpa.maxReplicas" }}
{{- if $v.autoscaling.keda.enabled }}
{{- $globalMin = int $v.autoscaling.keda.minReplicaCount }}
{{- $globalMax = int $v.autoscaling.keda.maxReplicaCount }}
{{- $source = "autoscaling.keda.maxReplicaCount" }}
{{- end }}
{{- $min := $globalMin }}
{{- if gt (int $w.autoscaling.minReplicas) 0 }}
{{- $min = int $w.autoscaling.minReplicas }}
{{- end }}
{{- $max := $partitions }}
{{- if gt $globalMax 0 }}
{{- $max = $globalMax }}
{{- end }}
{{- if gt (int $w.autoscaling.maxReplicas) 0 }}
{{- $max = int $w.autoscaling.maxReplicas }}
{{- $source = printf "workers.%s.autoscaling.maxReplicas" .projection }}
{{- end }}
{{- if gt $max $partitions }}
{{- fail (printf "%s (%d) exceeds workers.%s.partitions (%d): a consumer beyond the partition count gets no partition" $source $max .projection $partitions) }}
{{- end }}
{{- if gt $min $max }}
{{- fail (printf "the minimum replicas of worker %s (%d) exceed its maximum (%d)" .projection $min $max) }}
{{- end }}
min: {{ $min }}
max: {{ $max }}
{{- end }}

{{/*
Checks that span several values; included by the ConfigMap, which always renders.
*/}}
{{- define "courseview.validate" -}}
{{- if and .Values.autoscaling.keda.enabled .Values.autoscaling.hpa.enabled }}
{{- fail "autoscaling.keda.enabled and autoscaling.hpa.enabled are both true: the KEDA ScaledObject creates its own HPA for each worker, and two HPAs on one Deployment fight; enable one of them" }}
{{- end }}
{{- $_ := required "kafka.brokers is required (bootstrap servers, comma-separated)" .Values.kafka.brokers }}
{{- $_ := required "mongodb.uriSecret.name is required: an existing Secret holding the MongoDB connection string (key mongodb.uriSecret.key)" .Values.mongodb.uriSecret.name }}
{{- if .Values.redis.enabled }}
{{- $_ := required "redis.urlSecret.name is required: an existing Secret holding the Redis URL (or set redis.enabled=false to run without the cache)" .Values.redis.urlSecret.name }}
{{- end }}
{{- if and .Values.kafka.tls.certSecret.name (not .Values.kafka.tls.keySecret.name) }}
{{- fail "kafka.tls.certSecret needs kafka.tls.keySecret (the client certificate's private key)" }}
{{- end }}
{{- if and .Values.kafka.tls.keySecret.name (not .Values.kafka.tls.certSecret.name) }}
{{- fail "kafka.tls.keySecret needs kafka.tls.certSecret (the client certificate)" }}
{{- end }}
{{- if and .Values.redis.tls.certSecret.name (not .Values.redis.tls.keySecret.name) }}
{{- fail "redis.tls.certSecret needs redis.tls.keySecret (the client certificate's private key)" }}
{{- end }}
{{- if and .Values.redis.tls.keySecret.name (not .Values.redis.tls.certSecret.name) }}
{{- fail "redis.tls.keySecret needs redis.tls.certSecret (the client certificate)" }}
{{- end }}
{{- if and .Values.autoscaling.keda.enabled (eq .Values.autoscaling.keda.trigger "prometheus") }}
{{- $_ := required "autoscaling.keda.prometheus.serverAddress is required with autoscaling.keda.trigger=prometheus" .Values.autoscaling.keda.prometheus.serverAddress }}
{{- end }}
{{- if and .Values.autoscaling.keda.kafka.authenticationRef.name .Values.autoscaling.keda.kafka.triggerAuthentication.create }}
{{- fail "autoscaling.keda.kafka.authenticationRef.name and autoscaling.keda.kafka.triggerAuthentication.create are exclusive: use an existing TriggerAuthentication or let the chart create one" }}
{{- end }}
{{- if or .Values.autoscaling.keda.enabled .Values.autoscaling.hpa.enabled }}
{{- range $p := splitList " " (include "courseview.projections" .) }}
{{- if (index $.Values.workers $p).enabled }}
{{- $_ := include "courseview.workerReplicaBounds" (dict "root" $ "projection" $p) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The files mounted from existing Secrets for a role: (dict "root" $ "role" "api|worker|rebuild|producer").
Renders YAML {files: [{env, file, name, key}]}; read it with fromYaml.
*/}}
{{- define "courseview.secretFiles" -}}
{{- $v := .root.Values }}
{{- $files := list }}
{{- $files = append $files (dict "env" "MONGODB_URI_FILE" "file" "mongodb-uri" "ref" $v.mongodb.uriSecret) }}
{{- if $v.redis.enabled }}
{{- $files = append $files (dict "env" "REDIS_URL_FILE" "file" "redis-url" "ref" $v.redis.urlSecret) }}
{{- if $v.redis.tls.caSecret.name }}
{{- $files = append $files (dict "env" "REDIS_CA_FILE" "file" "redis-ca.crt" "ref" $v.redis.tls.caSecret) }}
{{- end }}
{{- if $v.redis.tls.certSecret.name }}
{{- $files = append $files (dict "env" "REDIS_CERT_FILE" "file" "redis-tls.crt" "ref" $v.redis.tls.certSecret) }}
{{- end }}
{{- if $v.redis.tls.keySecret.name }}
{{- $files = append $files (dict "env" "REDIS_KEY_FILE" "file" "redis-tls.key" "ref" $v.redis.tls.keySecret) }}
{{- end }}
{{- end }}
{{- if $v.kafka.sasl.passwordSecret.name }}
{{- $files = append $files (dict "env" "COURSEVIEW_KAFKA_PASSWORD_FILE" "file" "kafka-password" "ref" $v.kafka.sasl.passwordSecret) }}
{{- end }}
{{- if $v.kafka.tls.caSecret.name }}
{{- $files = append $files (dict "env" "COURSEVIEW_KAFKA_CA_FILE" "file" "kafka-ca.crt" "ref" $v.kafka.tls.caSecret) }}
{{- end }}
{{- if $v.kafka.tls.certSecret.name }}
{{- $files = append $files (dict "env" "COURSEVIEW_KAFKA_CERT_FILE" "file" "kafka-tls.crt" "ref" $v.kafka.tls.certSecret) }}
{{- end }}
{{- if $v.kafka.tls.keySecret.name }}
{{- $files = append $files (dict "env" "COURSEVIEW_KAFKA_KEY_FILE" "file" "kafka-tls.key" "ref" $v.kafka.tls.keySecret) }}
{{- end }}
{{- if $v.kafka.configSecret.name }}
{{- $files = append $files (dict "env" "COURSEVIEW_KAFKA_CONFIG" "file" "kafka.properties" "ref" $v.kafka.configSecret) }}
{{- end }}
{{- if eq .role "api" }}
{{- if $v.api.jwt.hs256Secret.name }}
{{- $files = append $files (dict "env" "COURSEVIEW_JWT_SECRET_FILE" "file" "jwt-secret" "ref" $v.api.jwt.hs256Secret) }}
{{- end }}
{{- if $v.api.jwt.publicKeySecret.name }}
{{- $files = append $files (dict "env" "COURSEVIEW_JWT_PUBLIC_KEY" "file" "jwt-public.pem" "ref" $v.api.jwt.publicKeySecret) }}
{{- end }}
{{- if $v.api.jwt.jwksSecret.name }}
{{- $files = append $files (dict "env" "COURSEVIEW_JWT_JWKS" "file" "jwt-jwks.json" "ref" $v.api.jwt.jwksSecret) }}
{{- end }}
{{- end }}
files:
{{- range $files }}
  - env: {{ .env }}
    file: {{ .file | quote }}
    name: {{ .ref.name | quote }}
    key: {{ required (printf "the key of the Secret %s (for %s) must not be empty" .ref.name .env) .ref.key | quote }}
{{- end }}
{{- end }}

{{/*
Where the secret files are mounted.
*/}}
{{- define "courseview.secretsDir" -}}
/var/run/secrets/courseview
{{- end }}

{{/*
Environment every courseview container gets, as list items: (dict "root" $ "role" "api").
The ConfigMap comes in through envFrom; this adds the *_FILE variables of the mounted secrets.
*/}}
{{- define "courseview.secretEnv" -}}
{{- $env := list }}
{{- range (include "courseview.secretFiles" . | fromYaml).files }}
{{- $env = append $env (dict "name" .env "value" (printf "%s/%s" (include "courseview.secretsDir" $.root) .file)) }}
{{- end }}
{{- with .root.Values.kafka.sasl.username }}
{{- $env = append $env (dict "name" "COURSEVIEW_KAFKA_USERNAME" "value" .) }}
{{- end }}
{{- with $env }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/*
envFrom of every courseview container: the chart's ConfigMap, then the user's.
*/}}
{{- define "courseview.envFrom" -}}
- configMapRef:
    name: {{ include "courseview.configMapName" . }}
{{- with .Values.envFrom }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Volume mounts of every courseview container: (dict "root" $ "role" "api").
*/}}
{{- define "courseview.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: secrets
  mountPath: {{ include "courseview.secretsDir" .root }}
  readOnly: true
{{- with .root.Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Volumes of every courseview pod: (dict "root" $ "role" "api").
One projected volume holds every secret file (each file from its own Secret and key).
*/}}
{{- define "courseview.volumes" -}}
{{- $files := (include "courseview.secretFiles" . | fromYaml).files -}}
- name: tmp
  emptyDir: {}
- name: secrets
  projected:
    defaultMode: 0440
    sources:
      {{- range $files }}
      - secret:
          name: {{ .name }}
          items:
            - key: {{ .key }}
              path: {{ .file }}
      {{- end }}
{{- with .root.Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Pod annotations: the config checksum, then the shared and the component's annotations.
(dict "root" $ "annotations" .Values.api.podAnnotations)
*/}}
{{- define "courseview.podAnnotations" -}}
checksum/config: {{ include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum }}
{{- $merged := merge (deepCopy (default (dict) .annotations)) (deepCopy (default (dict) .root.Values.podAnnotations)) }}
{{- with $merged }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Pod labels: the component's selector labels, the chart's labels, then the shared and the component's extra labels.
(dict "root" $ "component" "api" "projection" "" "labels" .Values.api.podLabels)
*/}}
{{- define "courseview.podLabels" -}}
{{ include "courseview.componentLabels" . }}
{{- $merged := merge (deepCopy (default (dict) .labels)) (deepCopy (default (dict) .root.Values.podLabels)) }}
{{- with $merged }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Scheduling of a pod: the component's setting when non-empty, the shared one otherwise.
(dict "root" $ "component" "worker" "projection" "catalog" "values" $w)
*/}}
{{- define "courseview.scheduling" -}}
{{- $v := .values }}
{{- $g := .root.Values }}
{{- with (default $g.nodeSelector $v.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $g.tolerations $v.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $g.affinity $v.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $tsc := default $g.topologySpreadConstraints (dig "topologySpreadConstraints" (list) $v) }}
{{- if $tsc }}
{{- $selector := include "courseview.componentSelectorLabels" . | fromYaml }}
{{- $out := list }}
{{- range $tsc }}
{{- $c := deepCopy . }}
{{- if not (hasKey $c "labelSelector") }}
{{- $_ := set $c "labelSelector" (dict "matchLabels" $selector) }}
{{- end }}
{{- $out = append $out $c }}
{{- end }}
topologySpreadConstraints:
  {{- toYaml $out | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Pod-level settings every courseview pod shares.
*/}}
{{- define "courseview.podCommon" -}}
serviceAccountName: {{ include "courseview.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Container-level settings every courseview container shares (image, security context).
*/}}
{{- define "courseview.containerCommon" -}}
image: {{ include "courseview.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
{{- with .Values.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
KEDA's sasl metadata, from kafka.sasl.mechanism unless set.
*/}}
{{- define "courseview.kedaSasl" -}}
{{- $k := .Values.autoscaling.keda.kafka }}
{{- if $k.sasl }}
{{- $k.sasl }}
{{- else }}
{{- $m := upper .Values.kafka.sasl.mechanism }}
{{- $p := lower .Values.kafka.securityProtocol }}
{{- if or (eq $p "sasl_ssl") (eq $p "sasl_plaintext") }}
{{- if eq $m "PLAIN" }}plaintext
{{- else if eq $m "SCRAM-SHA-256" }}scram_sha256
{{- else if eq $m "SCRAM-SHA-512" }}scram_sha512
{{- else if eq $m "OAUTHBEARER" }}oauthbearer
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
KEDA's tls metadata, from kafka.securityProtocol unless set.
*/}}
{{- define "courseview.kedaTls" -}}
{{- $k := .Values.autoscaling.keda.kafka }}
{{- if $k.tls }}
{{- $k.tls }}
{{- else }}
{{- $p := lower .Values.kafka.securityProtocol }}
{{- if or (eq $p "ssl") (eq $p "sasl_ssl") }}enable{{- end }}
{{- end }}
{{- end }}

{{/*
The TriggerAuthentication a worker's kafka trigger uses, as YAML {name, kind}, or nothing.
*/}}
{{- define "courseview.kedaKafkaAuthRef" -}}
{{- $k := .Values.autoscaling.keda.kafka }}
{{- if $k.authenticationRef.name }}
name: {{ $k.authenticationRef.name }}
kind: {{ default "TriggerAuthentication" $k.authenticationRef.kind }}
{{- else if $k.triggerAuthentication.create }}
name: {{ include "courseview.suffixedName" (dict "root" . "suffix" "keda-kafka") }}
kind: TriggerAuthentication
{{- end }}
{{- end }}

{{/*
A scalar as a string, whole numbers without an exponent (values files give
numbers as float64, which print 8388608 as 8.388608e+06).
*/}}
{{- define "courseview.scalar" -}}
{{- if kindIs "float64" . }}
{{- if eq (float64 (int64 .)) . }}
{{- int64 . }}
{{- else }}
{{- . }}
{{- end }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}
