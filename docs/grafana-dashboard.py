"""Generates docs/grafana-dashboard.json (run from the repository root: python3 docs/grafana-dashboard.py).

Edit panels here rather than in the JSON; tests/it/telemetry.rs checks every query with
`promtool check rules` and that each metric it uses is listed in docs/metrics.md.
"""
import json
panels=[]
y=0
pid=1
def ts(title, exprs, unit="short", w=12, h=8, x=0, legend=None, stack=False):
    global pid
    p={"id":pid,"type":"timeseries","title":title,
       "datasource":{"type":"prometheus","uid":"${datasource}"},
       "gridPos":{"h":h,"w":w,"x":x,"y":0},
       "fieldConfig":{"defaults":{"unit":unit,"custom":{"stacking":{"mode":"normal" if stack else "none"}}},"overrides":[]},
       "options":{"legend":{"displayMode":"table","placement":"bottom","calcs":["mean","max"]},"tooltip":{"mode":"multi"}},
       "targets":[{"refId":chr(65+i),"expr":e,"legendFormat":l,"datasource":{"type":"prometheus","uid":"${datasource}"}} for i,(e,l) in enumerate(exprs)]}
    pid+=1
    return p
def stat(title, expr, unit="short", w=4, h=4, x=0, thresholds=None):
    global pid
    p={"id":pid,"type":"stat","title":title,
       "datasource":{"type":"prometheus","uid":"${datasource}"},
       "gridPos":{"h":h,"w":w,"x":x,"y":0},
       "fieldConfig":{"defaults":{"unit":unit,"thresholds":thresholds or {"mode":"absolute","steps":[{"color":"green","value":None}]}},"overrides":[]},
       "options":{"reduceOptions":{"calcs":["lastNotNull"]},"colorMode":"value"},
       "targets":[{"refId":"A","expr":expr,"datasource":{"type":"prometheus","uid":"${datasource}"}}]}
    pid+=1
    return p
def row(title):
    global pid
    p={"id":pid,"type":"row","title":title,"collapsed":False,"gridPos":{"h":1,"w":24,"x":0,"y":0},"panels":[]}
    pid+=1
    return p
sel='job=~"$job", instance=~"$instance"'
S='{'+sel+'}'
def f(extra=""):
    return '{'+sel+(", "+extra if extra else "")+'}'
layout=[]
layout.append([row("Overview")])
red='{"mode":"absolute","steps":[{"color":"green","value":null},{"color":"red","value":0.01}]}'
layout.append([
 stat("Requests/s", f'sum(rate(outrigger_http_responses_total{S}[$__rate_interval]))', "reqps", x=0),
 stat("5xx ratio", f'sum(rate(outrigger_http_responses_total{f(chr(99)+"lass="+chr(34)+"5xx"+chr(34))}[$__rate_interval])) / sum(rate(outrigger_http_responses_total{S}[$__rate_interval]))', "percentunit", x=4, thresholds=json.loads(red)),
 stat("p99 latency (headers)", f'histogram_quantile(0.99, sum by (le) (rate(outrigger_http_response_latency_seconds_bucket{S}[$__rate_interval])))', "s", x=8),
 stat("App ready", f'min(outrigger_app_ready{S})', "bool", x=12),
 stat("Resident memory", f'max(process_resident_memory_bytes{S})', "bytes", x=16),
 stat("Module restarts (1h)", f'sum(increase(outrigger_module_restarts_total{S}[1h]))', "short", x=20),
])
layout.append([row("HTTP traffic (RED)")])
layout.append([
 ts("Requests/s by route", [(f'sum by (direction, route, cluster) (rate(outrigger_http_requests_total{S}[$__rate_interval]))',"{{direction}} {{route}} → {{cluster}}")], "reqps", x=0),
 ts("Responses/s by status class", [(f'sum by (direction, class) (rate(outrigger_http_responses_total{S}[$__rate_interval]))',"{{direction}} {{class}}")], "reqps", x=12, stack=True),
])
layout.append([
 ts("Outrigger's own error answers", [(f'sum by (direction, route, error) (rate(outrigger_http_responses_total{f(chr(101)+"rror!="+chr(34)+chr(34))}[$__rate_interval]))',"{{direction}} {{route}} {{error}}")], "reqps", x=0),
 ts("Error ratio (5xx) by cluster", [(f'sum by (cluster) (rate(outrigger_http_responses_total{f("class="+chr(34)+"5xx"+chr(34))}[$__rate_interval])) / sum by (cluster) (rate(outrigger_http_responses_total{S}[$__rate_interval]))',"{{cluster}}")], "percentunit", x=12),
])
layout.append([
 ts("Latency to response headers by cluster", [(f'histogram_quantile({q}, sum by (le, cluster) (rate(outrigger_http_response_latency_seconds_bucket{S}[$__rate_interval])))',"p"+str(int(float(q)*100))+" {{cluster}}") for q in ("0.5","0.9","0.99")], "s", x=0),
 ts("Total duration (to end of body) by cluster", [(f'histogram_quantile({q}, sum by (le, cluster) (rate(outrigger_http_request_duration_seconds_bucket{S}[$__rate_interval])))',"p"+str(int(float(q)*100))+" {{cluster}}") for q in ("0.5","0.9","0.99")], "s", x=12),
])
layout.append([
 ts("Body bytes/s by route", [(f'sum by (route) (rate(outrigger_http_request_body_bytes_total{S}[$__rate_interval]))',"in {{route}}"),(f'sum by (route) (rate(outrigger_http_response_body_bytes_total{S}[$__rate_interval]))',"out {{route}}")], "Bps", x=0),
 ts("Connections", [(f'sum by (direction, listener) (outrigger_connections_open{S})',"open {{listener}}"),(f'sum by (listener) (rate(outrigger_connections_opened_total{S}[$__rate_interval]))',"opened/s {{listener}}")], "short", x=12),
])
layout.append([row("Resilience")])
layout.append([
 ts("Retries", [(f'sum by (cluster, outcome) (rate(outrigger_retries_total{S}[$__rate_interval]))',"{{cluster}} {{outcome}}")], "ops", w=8, x=0),
 ts("Shed requests", [(f'sum by (listener, reason) (rate(outrigger_shed_requests_total{S}[$__rate_interval]))',"{{listener}} {{reason}}")], "reqps", w=8, x=8),
 ts("Endpoints and ejections", [(f'sum by (cluster) (outrigger_cluster_endpoints{S})',"endpoints {{cluster}}"),(f'sum by (cluster) (increase(outrigger_endpoint_ejections_total{S}[$__rate_interval]))',"ejections {{cluster}}")], "short", w=8, x=16),
])
layout.append([row("TLS")])
layout.append([
 ts("Handshakes by result", [(f'sum by (side, name, result) (rate(outrigger_tls_handshakes_total{S}[$__rate_interval]))',"{{side}} {{name}} {{result}}")], "ops", x=0),
 ts("Days until certificate expiry", [(f'min by (owner, path) (outrigger_tls_cert_expiry_seconds{S}) / 86400',"{{owner}} {{path}}")], "d", x=12),
])
layout.append([row("Bridge (Dapr API)")])
layout.append([
 ts("Bridge calls/s by API and status", [(f'sum by (api, status_class) (rate(outrigger_bridge_requests_total{S}[$__rate_interval]))',"{{api}} {{status_class}}")], "reqps", w=8, x=0),
 ts("Bridge latency p50/p99 by API", [(f'histogram_quantile({q}, sum by (le, api) (rate(outrigger_bridge_request_duration_seconds_bucket{S}[$__rate_interval])))',"p"+str(int(float(q)*100))+" {{api}}") for q in ("0.5","0.99")], "s", w=8, x=8),
 ts("Pub/sub", [(f'sum by (pubsub, result) (rate(outrigger_pubsub_published_total{S}[$__rate_interval]))',"published {{pubsub}} {{result}}"),(f'sum by (pubsub, topic, result) (rate(outrigger_pubsub_delivered_total{S}[$__rate_interval]))',"delivered {{pubsub}}/{{topic}} {{result}}")], "ops", w=8, x=16),
])
layout.append([row("Telemetry, app and process")])
layout.append([
 ts("Spans and access log", [(f'sum(rate(outrigger_spans_exported_total{S}[$__rate_interval]))',"spans exported"),(f'sum by (reason) (rate(outrigger_spans_dropped_total{S}[$__rate_interval]))',"spans dropped {{reason}}"),(f'sum(rate(outrigger_access_log_dropped_total{S}[$__rate_interval]))',"access log dropped")], "ops", w=8, x=0),
 ts("App", [(f'max(outrigger_app_ready{S})',"ready"),(f'sum(increase(outrigger_app_restarts_total{S}[$__rate_interval]))',"restarts"),(f'sum(increase(outrigger_app_probe_failures_total{S}[$__rate_interval]))',"probe failures")], "short", w=8, x=8),
 ts("Config reloads", [(f'sum by (result) (increase(outrigger_config_reloads_total{S}[$__rate_interval]))',"config {{result}}"),(f'sum by (reload, result) (increase(outrigger_reload_actions_total{S}[$__rate_interval]))',"{{reload}} {{result}}")], "short", w=8, x=16),
])
layout.append([
 ts("CPU", [(f'rate(process_cpu_seconds_total{S}[$__rate_interval])',"{{instance}}")], "percentunit", x=0),
 ts("Memory", [(f'process_resident_memory_bytes{S}',"RSS {{instance}}")], "bytes", x=12),
])
out=[]
y=0
for r in layout:
    h=max(p["gridPos"]["h"] for p in r)
    for p in r:
        p["gridPos"]["y"]=y
        out.append(p)
    y+=h
dash={
 "__inputs":[{"name":"DS_PROMETHEUS","label":"Prometheus","type":"datasource","pluginId":"prometheus","pluginName":"Prometheus"}],
 "__requires":[{"type":"grafana","id":"grafana","name":"Grafana","version":"10.0.0"},{"type":"datasource","id":"prometheus","name":"Prometheus","version":"1.0.0"}],
 "title":"Outrigger","uid":"outrigger-sidecar","tags":["outrigger","sidecar"],"timezone":"browser",
 "schemaVersion":39,"version":1,"editable":True,"refresh":"30s","time":{"from":"now-1h","to":"now"},
 "templating":{"list":[
   {"name":"datasource","type":"datasource","query":"prometheus","label":"Data source","current":{}},
   {"name":"job","type":"query","datasource":{"type":"prometheus","uid":"${datasource}"},"query":{"query":"label_values(outrigger_build_info, job)","refId":"job"},"definition":"label_values(outrigger_build_info, job)","includeAll":True,"multi":True,"allValue":".*","refresh":2,"current":{}},
   {"name":"instance","type":"query","datasource":{"type":"prometheus","uid":"${datasource}"},"query":{"query":"label_values(outrigger_build_info{job=~\"$job\"}, instance)","refId":"instance"},"definition":"label_values(outrigger_build_info{job=~\"$job\"}, instance)","includeAll":True,"multi":True,"allValue":".*","refresh":2,"current":{}},
 ]},
 "panels":out,
}
json.dump(dash, open("docs/grafana-dashboard.json","w"), indent=2)
print(len(out), "panels")
