#!/usr/bin/env sh
# Makes the injector's serving certificate with `outrigger certs`, stores it as the Secret the
# Deployment mounts, and puts the CA in the webhook's caBundle. Run after `kubectl apply -k`.
# A development CA (ten years, key in ./certs): for production use cert-manager or your PKI,
# the injector re-reads renewed files by itself.
set -eu
NS=${NS:-outrigger-system}
SVC=outrigger-injector.$NS.svc
OUT=${OUT:-certs}
outrigger certs ca --out "$OUT" --trust-domain cluster.local
outrigger certs issue --ca "$OUT" --out "$OUT" --name injector --dns "$SVC" --dns "$SVC.cluster.local"
kubectl -n "$NS" create secret tls outrigger-injector-tls \
  --cert "$OUT/injector.crt" --key "$OUT/injector.key" --dry-run=client -o yaml | kubectl apply -f -
kubectl patch mutatingwebhookconfiguration outrigger-injector --type=json \
  -p "[{\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$(base64 -w0 "$OUT/ca.crt")\"}]"
