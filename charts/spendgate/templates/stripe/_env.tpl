{{/* The operator's Stripe settings: SPENDGATE_STRIPE_<field of StripeSettings>
     (operator/stripe/settings.py). Secrets are passed as "name/key" references: the operator
     reads them from the API in its own namespace, so their values never sit in the pod spec. */}}
{{- define "spendgate.stripe.env" -}}
{{- $st := .Values.stripe }}
- name: SPENDGATE_STRIPE_ENABLED
  value: "true"
- name: SPENDGATE_STRIPE_API_KEY_SECRET
  value: {{ printf "%s/%s" $st.apiKeySecret.name $st.apiKeySecret.key | quote }}
- name: SPENDGATE_STRIPE_WEBHOOK_SECRET
  value: {{ printf "%s/%s" $st.webhookSecret.name $st.webhookSecret.key | quote }}
- name: SPENDGATE_STRIPE_WEBHOOK_SECRET_NEXT
  value: {{ ternary (printf "%s/%s" $st.webhookSecret.name $st.webhookSecret.nextKey) "" (ne $st.webhookSecret.nextKey "") | quote }}
- name: SPENDGATE_STRIPE_WEBHOOK_PORT
  value: {{ $st.receiver.port | quote }}
- name: SPENDGATE_STRIPE_WEBHOOK_PATH
  value: {{ $st.receiver.path | quote }}
- name: SPENDGATE_STRIPE_METER_EVENT_NAME
  value: {{ $st.meter.eventName | quote }}
- name: SPENDGATE_STRIPE_METER_CUSTOMER_KEY
  value: {{ $st.meter.customerKey | quote }}
- name: SPENDGATE_STRIPE_METER_VALUE_KEY
  value: {{ $st.meter.valueKey | quote }}
- name: SPENDGATE_STRIPE_METER_VALUE_UNIT
  value: {{ $st.meter.valueUnit | quote }}
{{- if $st.import.enabled }}
# Budgets synced from Stripe: the template is the mounted ConfigMap (re-read when it changes).
- name: SPENDGATE_STRIPE_IMPORT_ENABLED
  value: "true"
- name: SPENDGATE_STRIPE_IMPORT_NAMESPACE
  value: {{ include "spendgate.stripe.importNamespace" . | quote }}
- name: SPENDGATE_STRIPE_IMPORT_METADATA_KEY
  value: {{ $st.import.metadata.key | quote }}
- name: SPENDGATE_STRIPE_IMPORT_METADATA_VALUE
  value: {{ $st.import.metadata.value | quote }}
- name: SPENDGATE_STRIPE_IMPORT_INTERVAL_S
  value: {{ $st.import.intervalSeconds | quote }}
- name: SPENDGATE_STRIPE_IMPORT_TEMPLATE_FILE
  value: /etc/spendgate/stripe-import/template.yaml
{{- end }}
{{- range $field, $value := $st.settings }}
- name: {{ printf "SPENDGATE_STRIPE_%s" (upper $field) }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* The ConfigMap holding the template of budgets synced from Stripe (stripe.import). */}}
{{- define "spendgate.stripe.importConfigMap" -}}
{{- .Values.stripe.import.existingConfigMap | default (printf "%s-stripe-import" (include "spendgate.fullname" .) | trunc 63 | trimSuffix "-") }}
{{- end }}

{{/* stripe.import.namespace, checked: required, and watched when the operator watches some. */}}
{{- define "spendgate.stripe.importNamespace" -}}
{{- $ns := required "stripe.import.namespace is required with stripe.import.enabled" .Values.stripe.import.namespace }}
{{- if and .Values.operator.watchNamespaces (not (has $ns .Values.operator.watchNamespaces)) }}
{{- fail (printf "stripe.import.namespace %q must be one of operator.watchNamespaces" $ns) }}
{{- end }}
{{- $ns }}
{{- end }}
