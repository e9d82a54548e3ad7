{{/* Transport security and authentication (values tls.*, auth.*; docs/security.md). */}}

{{- define "dsmoe.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "dsmoe.fullname" .)) .Values.tls.secretName -}}
{{- end -}}

{{- define "dsmoe.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "dsmoe.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/* The security flags of a server: (dict "root" $ "component" "gateway"). */}}
{{- define "dsmoe.securityArgs" -}}
{{- $v := .root.Values -}}
{{- if $v.tls.enabled }}
- --tls-cert=/var/run/secrets/dsmoe/tls/tls.crt
- --tls-key=/var/run/secrets/dsmoe/tls/tls.key
- --tls-ca=/var/run/secrets/dsmoe/tls/ca.crt
{{- if eq .component "gateway" }}
- --tls-client-auth={{ $v.tls.gatewayClientAuth }}
{{- end }}
{{- else }}
- --insecure
{{- end }}
- --health-listen=0.0.0.0:{{ $v.tls.healthPort }}
{{- if eq .component "gateway" }}
{{- if $v.auth.enabled }}
- --api-keys=/var/run/secrets/dsmoe/api-keys/api-keys
{{- with $v.auth.rateLimit }}
{{- if gt (float64 .requestsPerSecond) 0.0 }}
- --rate-limit-rps={{ .requestsPerSecond }}
{{- end }}
{{- if gt (float64 .requestBurst) 0.0 }}
- --rate-limit-burst={{ .requestBurst }}
{{- end }}
{{- if gt (float64 .tokensPerMinute) 0.0 }}
- --rate-limit-tokens-per-minute={{ .tokensPerMinute }}
{{- end }}
{{- if gt (float64 .tokenBurst) 0.0 }}
- --rate-limit-token-burst={{ .tokenBurst }}
{{- end }}
{{- end }}
{{- else }}
- --no-auth
{{- end }}
{{- end }}
{{- end -}}

{{/* Volume mounts of the secrets a server reads: (dict "root" $ "component" "gateway"). */}}
{{- define "dsmoe.securityMounts" -}}
{{- if .root.Values.tls.enabled }}
- name: tls
  mountPath: /var/run/secrets/dsmoe/tls
  readOnly: true
{{- end }}
{{- if and (eq .component "gateway") .root.Values.auth.enabled }}
- name: api-keys
  mountPath: /var/run/secrets/dsmoe/api-keys
  readOnly: true
{{- end }}
{{- end -}}

{{- define "dsmoe.securityVolumes" -}}
{{- if .root.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "dsmoe.tlsSecretName" .root }}
    defaultMode: 0440
{{- end }}
{{- if and (eq .component "gateway") .root.Values.auth.enabled }}
- name: api-keys
  secret:
    secretName: {{ include "dsmoe.apiKeysSecretName" .root }}
    defaultMode: 0440
{{- end }}
{{- end -}}
