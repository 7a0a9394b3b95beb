//! Adding Outrigger to one pod spec: the sidecar container (native: an init container with
//! `restartPolicy: Always`; legacy: a regular container and `outrigger wait` in front of the
//! app's command), its volumes, the app containers' environment, and the pod's
//! `terminationGracePeriodSeconds`. Input: a pod template's metadata and spec (JSON values);
//! output: the spec changed in place, or why it was left alone.

use serde_json::{Map, Value, json};

use super::annotations::{self, Annotations};

/// The sidecar container's name; a pod with a container of this name is injected already.
pub const CONTAINER: &str = "outrigger";
/// The legacy mode's init container that copies the binary for `outrigger wait`.
pub const INSTALL_CONTAINER: &str = "outrigger-install";
/// The admin port: probes come from the kubelet, so in a pod admin listens on all addresses
/// (its endpoints that change something still answer only loopback peers).
pub const ADMIN_PORT: u16 = 9901;
/// Dapr's default HTTP and gRPC ports, so SDKs find the bridge without configuration.
pub const BRIDGE_HTTP_PORT: u16 = 3500;
pub const BRIDGE_GRPC_PORT: u16 = 50001;
/// Where the config ConfigMap is mounted; the key must be `outrigger.yaml`.
pub const CONFIG_DIR: &str = "/etc/outrigger";
/// The shared emptyDir for unix sockets (`unix:/run/outrigger/…` in the config).
pub const SOCKETS_DIR: &str = "/run/outrigger";
/// Legacy mode: where the app containers find the `outrigger` binary for `outrigger wait`.
pub const BIN_DIR: &str = "/outrigger";
/// Kubernetes' default `terminationGracePeriodSeconds`, also `runtime.shutdown_grace`'s default.
pub const DEFAULT_GRACE_SECONDS: u64 = 30;
/// A non-root user id (distroless' `nonroot`): `runAsNonRoot` needs a numeric id to check.
pub const RUN_AS_USER: u64 = 65532;

/// Resources when no annotation says otherwise: one worker thread rarely needs more than a
/// fraction of a core; idle RSS is a few MiB (docs/BENCHMARKS.md), the limit leaves room for
/// bursts of buffered bodies.
const CPU_REQUEST: &str = "50m";
const CPU_LIMIT: &str = "1";
const MEMORY_REQUEST: &str = "32Mi";
const MEMORY_LIMIT: &str = "128Mi";

const SOCKETS_VOLUME: &str = "outrigger-sockets";
const CONFIG_VOLUME: &str = "outrigger-config";
const IDENTITY_VOLUME: &str = "outrigger-identity";
/// Where the identity Secret is mounted (`tls.crt`, `tls.key`, `ca.crt`), in the sidecar only:
/// the app never holds the key.
pub const IDENTITY_DIR: &str = "/var/run/outrigger/identity";
/// The identity Secret of service account SA is `outrigger-identity-SA`.
pub const IDENTITY_SECRET_PREFIX: &str = "outrigger-identity-";
/// With the mesh (`outrigger.dev/mesh`): its mutual-TLS port (`mesh.address`), the same in
/// every pod so that peers know where to call.
pub const MESH_PORT: u16 = 15443;
/// With the mesh and no `outrigger.dev/outbound-address`: where the app sends host-named
/// requests to mesh peers (`mesh.outbound_address`, `OUTRIGGER_OUTBOUND_ADDRESS`).
pub const MESH_OUTBOUND_ADDRESS: &str = "127.0.0.1:15001";
const BIN_VOLUME: &str = "outrigger-bin";

/// How to inject, beyond what the annotations say.
#[derive(Clone, Debug)]
pub struct Options {
    /// The sidecar image (the `outrigger.dev/image` annotation wins).
    pub image: String,
    /// Clusters older than 1.29: a regular container, and `outrigger wait` for the app.
    pub legacy: bool,
}

/// The image `inject` uses unless told otherwise.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/outrigger/outrigger:", env!("CARGO_PKG_VERSION"));

impl Default for Options {
    fn default() -> Self {
        Options {
            image: DEFAULT_IMAGE.into(),
            legacy: false,
        }
    }
}

/// What happened to a pod spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    /// It has a container named `outrigger` already (injecting twice changes nothing).
    AlreadyInjected,
    /// `outrigger.dev/inject: "false"`.
    OptedOut,
    /// Not a kind `inject` knows, though it has a pod template: why its pods get no sidecar.
    NotAWorkload(String),
}

/// Names that identify the workload, for its default app id.
#[derive(Clone, Debug, Default)]
pub struct Owner<'a> {
    /// The workload's (or the pod's) `metadata.name`.
    pub name: Option<&'a str>,
}

/// Adds Outrigger to `spec` (a PodSpec), following the annotations in `metadata` (the pod
/// template's). On error `spec` is unchanged.
pub fn inject_pod(
    metadata: Option<&Value>,
    spec: &mut Value,
    owner: &Owner<'_>,
    options: &Options,
) -> Result<Outcome, String> {
    let mut a = annotations::read(metadata.and_then(|m| m.get("annotations")))?;
    if a.mesh == Some(true) {
        // The mesh needs the workload's identity.
        a.identity = Some(true);
    }
    if a.inject == Some(false) {
        return Ok(Outcome::OptedOut);
    }
    let Some(pod) = spec.as_object() else {
        return Err("spec: expected a pod spec (a map)".into());
    };
    if [pod.get("containers"), pod.get("initContainers")]
        .into_iter()
        .flatten()
        .filter_map(Value::as_array)
        .flatten()
        .any(|c| c.get("name").and_then(Value::as_str) == Some(CONTAINER))
    {
        return Ok(Outcome::AlreadyInjected);
    }
    let app_id = app_id(&a, metadata, owner)?;
    let mut new = pod.clone();
    if !matches!(new.get("containers"), Some(Value::Array(c)) if !c.is_empty()) {
        return Err("spec.containers: expected at least one container".into());
    }
    for (key, what) in [
        ("volumes", "volume"),
        ("containers", "container"),
        ("initContainers", "container"),
    ] {
        if let Some(list) = new.get(key).and_then(Value::as_array) {
            for item in list {
                let name = item.get("name").and_then(Value::as_str).unwrap_or("");
                if [
                    SOCKETS_VOLUME,
                    CONFIG_VOLUME,
                    IDENTITY_VOLUME,
                    BIN_VOLUME,
                    INSTALL_CONTAINER,
                ]
                .contains(&name)
                {
                    return Err(format!(
                        "spec.{key}: a {what} named {name} exists already (Outrigger's name); rename it"
                    ));
                }
            }
        }
    }

    let bridge = a.bridge != Some(false);
    let mesh = a.mesh == Some(true);
    ports_are_free(&a, &new, bridge, mesh)?;
    let (grace, pod_grace) = grace_seconds(&a, &new)?;
    let identity = identity_secret(&a, &new)?;
    new.insert("terminationGracePeriodSeconds".into(), json!(pod_grace));

    // Environment for every app container; a variable the container sets itself is kept.
    let mut app_env = vec![
        ("OUTRIGGER_ADMIN_ADDRESS", format!("127.0.0.1:{ADMIN_PORT}")),
        ("APP_ID", app_id.clone()),
    ];
    if bridge {
        app_env.extend([
            ("DAPR_HTTP_PORT", BRIDGE_HTTP_PORT.to_string()),
            ("DAPR_GRPC_PORT", BRIDGE_GRPC_PORT.to_string()),
            (
                "DAPR_HTTP_ENDPOINT",
                format!("http://127.0.0.1:{BRIDGE_HTTP_PORT}"),
            ),
            (
                "DAPR_GRPC_ENDPOINT",
                format!("http://127.0.0.1:{BRIDGE_GRPC_PORT}"),
            ),
        ]);
    }
    match &a.outbound_address {
        Some(out) => app_env.push(("OUTRIGGER_OUTBOUND_ADDRESS", out.clone())),
        None if mesh => app_env.push(("OUTRIGGER_OUTBOUND_ADDRESS", MESH_OUTBOUND_ADDRESS.into())),
        None => {}
    }
    let job = matches!(
        new.get("restartPolicy").and_then(Value::as_str),
        Some("Never" | "OnFailure")
    );
    let Some(Value::Array(list)) = new.get_mut("containers") else {
        unreachable!("checked above")
    };
    for (i, c) in list.iter_mut().enumerate() {
        let Some(c) = c.as_object_mut() else {
            return Err(format!(
                "spec.containers[{i}]: expected a container (a map)"
            ));
        };
        add_env(c, &app_env).map_err(|e| format!("spec.containers[{i}].{e}"))?;
        add_mount(c, SOCKETS_VOLUME, SOCKETS_DIR, false)
            .map_err(|e| format!("spec.containers[{i}].{e}"))?;
        if options.legacy {
            wrap_command(c, job).map_err(|e| format!("spec.containers[{i}]{e}"))?;
            add_mount(c, BIN_VOLUME, BIN_DIR, true)
                .map_err(|e| format!("spec.containers[{i}].{e}"))?;
        }
    }

    let image = a.image.clone().unwrap_or_else(|| options.image.clone());
    let mut sidecar = container(&a, &app_id, grace, bridge, &image, options.legacy);
    if identity.is_some() {
        sidecar["volumeMounts"]
            .as_array_mut()
            .expect("built above")
            .push(json!({"name": IDENTITY_VOLUME, "mountPath": IDENTITY_DIR, "readOnly": true}));
    }
    let mut volumes = vec![json!({"name": SOCKETS_VOLUME, "emptyDir": {}})];
    if let Some(cm) = &a.config {
        volumes.push(json!({"name": CONFIG_VOLUME, "configMap": {"name": cm}}));
    }
    if let Some(secret) = &identity {
        volumes.push(json!({"name": IDENTITY_VOLUME, "secret": {"secretName": secret}}));
    }
    if options.legacy {
        volumes.push(json!({"name": BIN_VOLUME, "emptyDir": {}}));
        // The app containers run `outrigger wait` from this volume; the sidecar image copies
        // itself there first (it has no shell or `cp`).
        let install = json!({
            "name": INSTALL_CONTAINER,
            "image": image,
            "args": ["install", "--to", BIN_DIR],
            "volumeMounts": [{"name": BIN_VOLUME, "mountPath": BIN_DIR}],
            "resources": sidecar["resources"].clone(),
            "securityContext": security_context(),
        });
        prepend(&mut new, "initContainers", install)?;
        if let Some(Value::Array(list)) = new.get_mut("containers") {
            // Last: `kubectl exec`/`logs` keep defaulting to the app (the first container).
            list.push(sidecar);
        }
    } else {
        // First among the init containers: the others (migrations, …) can use it too, and the
        // app containers start only once its startupProbe passes.
        prepend(&mut new, "initContainers", sidecar)?;
    }
    let vols = new.entry("volumes").or_insert_with(|| Value::Array(vec![]));
    match vols {
        Value::Array(list) => list.extend(volumes),
        Value::Null => *vols = Value::Array(volumes),
        _ => return Err("spec.volumes: expected a list".into()),
    }
    *spec = Value::Object(new);
    Ok(Outcome::Injected)
}

/// The app id: the annotation, else the `app.kubernetes.io/name` or `app` label, else the
/// workload's name.
fn app_id(a: &Annotations, metadata: Option<&Value>, owner: &Owner<'_>) -> Result<String, String> {
    if let Some(id) = &a.app_id {
        return Ok(id.clone());
    }
    let labels = metadata.and_then(|m| m.get("labels"));
    let candidate = ["app.kubernetes.io/name", "app"]
        .iter()
        .find_map(|l| labels.and_then(|m| m.get(*l)).and_then(Value::as_str))
        .or(owner.name)
        .or_else(|| metadata.and_then(|m| m.get("name")).and_then(Value::as_str));
    match candidate {
        Some(id)
            if !id.is_empty()
                && id.len() <= 63
                && id
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') =>
        {
            Ok(id.to_string())
        }
        Some(id) => Err(format!(
            "app id {id:?} (from the labels or the name) is not a DNS label; set {}app-id",
            annotations::PREFIX
        )),
        None => Err(format!(
            "no app id: set the {}app-id annotation, an app.kubernetes.io/name or app label, or a name",
            annotations::PREFIX
        )),
    }
}

/// `outrigger.dev/identity: "true"`: the Secret `outrigger-identity-SA` of the pod's service
/// account (`default` when none is named), whose certificate carries the SPIFFE ID
/// `spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SA` (docs/kubernetes.md). Not optional: a pod whose
/// Secret is missing waits for it, with an event naming it, rather than starting without TLS.
fn identity_secret(a: &Annotations, pod: &Map<String, Value>) -> Result<Option<String>, String> {
    if a.identity != Some(true) {
        return Ok(None);
    }
    let sa = match pod.get("serviceAccountName") {
        None | Some(Value::Null) => "default",
        Some(Value::String(s)) if !s.is_empty() => s.as_str(),
        Some(v) => {
            return Err(format!(
                "spec.serviceAccountName: expected a name, found {v}"
            ));
        }
    };
    let name = format!("{IDENTITY_SECRET_PREFIX}{sa}");
    if name.len() > 253 {
        return Err(format!(
            "spec.serviceAccountName: {sa:?} is too long for the identity Secret's name {name:?} (at most 253)"
        ));
    }
    Ok(Some(name))
}

/// The pod's containers share one network namespace: a port the app uses that the sidecar
/// binds too (admin, the bridge) would fail at run time, so it fails here. A `hostNetwork` pod
/// shares the node's ports with every other such pod: fixed ports there collide, and admin on
/// all addresses would face the node's network.
fn ports_are_free(
    a: &Annotations,
    pod: &Map<String, Value>,
    bridge: bool,
    mesh: bool,
) -> Result<(), String> {
    if pod.get("hostNetwork") == Some(&Value::Bool(true)) {
        return Err(format!(
            "spec.hostNetwork: a pod on the node's network cannot have the sidecar (its ports \
             {ADMIN_PORT}, {BRIDGE_HTTP_PORT} and {BRIDGE_GRPC_PORT} would be the node's); set {}inject: \"false\"",
            annotations::PREFIX
        ));
    }
    let mut ours = vec![(ADMIN_PORT, "admin")];
    if bridge {
        ours.extend([
            (BRIDGE_HTTP_PORT, "the bridge"),
            (BRIDGE_GRPC_PORT, "the bridge's gRPC"),
        ]);
    }
    if mesh {
        ours.push((MESH_PORT, "the mesh's"));
        if a.outbound_address.is_none() {
            ours.push((mesh_outbound_port(), "the mesh's outbound"));
        }
    }
    let mut used: Vec<(u64, String)> = Vec::new();
    if let Some(p) = a.app_port {
        used.push((
            p.into(),
            format!("annotation {}app-port", annotations::PREFIX),
        ));
    }
    for key in ["containers", "initContainers"] {
        for (i, c) in pod
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            for (j, p) in c
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                if let Some(n) = p.get("containerPort").and_then(Value::as_u64) {
                    used.push((n, format!("spec.{key}[{i}].ports[{j}].containerPort")));
                }
            }
        }
    }
    for (port, at) in used {
        if let Some((_, what)) = ours.iter().find(|(p, _)| u64::from(*p) == port) {
            return Err(format!(
                "{at}: port {port} is {what}'s in the sidecar, which shares the pod's network"
            ));
        }
    }
    Ok(())
}

fn mesh_outbound_port() -> u16 {
    MESH_OUTBOUND_ADDRESS
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("a host:port constant")
}

/// `runtime.shutdown_grace` and the pod's `terminationGracePeriodSeconds`, in seconds. The
/// sidecar's: the annotation, else the pod's own value, else Kubernetes' default (30). The
/// pod's: its own (or the default), raised to the sidecar's when lower — never lowered — so the
/// kubelet never kills a stop that is still within its grace.
fn grace_seconds(a: &Annotations, pod: &Map<String, Value>) -> Result<(u64, u64), String> {
    let pod_grace = match pod.get("terminationGracePeriodSeconds") {
        None | Some(Value::Null) => DEFAULT_GRACE_SECONDS,
        Some(v) => v.as_u64().ok_or_else(|| {
            format!("spec.terminationGracePeriodSeconds: expected a whole number, found {v}")
        })?,
    };
    let sidecar = a.shutdown_grace_seconds.unwrap_or(pod_grace).max(1);
    Ok((sidecar, pod_grace.max(sidecar)))
}

/// The sidecar container.
fn container(
    a: &Annotations,
    app_id: &str,
    grace: u64,
    bridge: bool,
    image: &str,
    legacy: bool,
) -> Value {
    let mut args = vec!["run".to_string()];
    if a.config.is_some() {
        args.extend(["-c".into(), format!("{CONFIG_DIR}/outrigger.yaml")]);
    }
    let mut set = |kv: String| args.extend(["--set".into(), kv]);
    // Overrides win over the ConfigMap: what the pod spec promises the app must hold.
    set(format!("runtime.shutdown_grace={grace}s"));
    if let Some(port) = a.app_port {
        set(format!("app.address=127.0.0.1:{port}"));
    }
    if let Some(p) = &a.app_protocol {
        set(format!("app.protocol={p}"));
    }
    if bridge {
        set(format!("bridge.address=127.0.0.1:{BRIDGE_HTTP_PORT}"));
        set(format!("bridge.grpc_address=127.0.0.1:{BRIDGE_GRPC_PORT}"));
    }
    let mesh = a.mesh == Some(true);
    if mesh {
        // The workload's SPIFFE ID is spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SA: the kubelet
        // expands $(VAR) in args from the container's env (the downward API's below).
        // Quoted: --set reads YAML, and a namespace or account named `123` is a string.
        set("mesh.namespace=\"$(POD_NAMESPACE)\"".into());
        set("mesh.service_account=\"$(POD_SERVICE_ACCOUNT)\"".into());
        set(format!("mesh.identity_dir={IDENTITY_DIR}"));
        set(format!("mesh.address=0.0.0.0:{MESH_PORT}"));
        if a.outbound_address.is_none() {
            set(format!("mesh.outbound_address={MESH_OUTBOUND_ADDRESS}"));
        }
    }
    let probe = |path: &str, period: u64, failures: u64| {
        json!({
            "httpGet": {"path": path, "port": ADMIN_PORT},
            "periodSeconds": period,
            "failureThreshold": failures,
        })
    };
    let mut mounts = vec![json!({"name": SOCKETS_VOLUME, "mountPath": SOCKETS_DIR})];
    if a.config.is_some() {
        mounts.push(json!({"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": true}));
    }
    let mut ports =
        vec![json!({"name": "outrigger-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"})];
    let mut env = vec![
        json!({"name": "OUTRIGGER_SERVICE", "value": app_id}),
        json!({"name": "OUTRIGGER_ADMIN_ADDRESS", "value": format!("0.0.0.0:{ADMIN_PORT}")}),
        json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
    ];
    if mesh {
        ports
            .push(json!({"name": "outrigger-mesh", "containerPort": MESH_PORT, "protocol": "TCP"}));
        env.push(json!({"name": "POD_SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}}));
    }
    let mut c = json!({
        "name": CONTAINER,
        "image": image,
        "args": args,
        "env": env,
        "ports": ports,
        // The startup probe ignores the app (`/ready/outbound`): a native sidecar's startup
        // gates the app's start, so waiting for the app here would wait forever.
        "startupProbe": probe("/ready/outbound", 1, 120),
        "readinessProbe": probe("/ready", 2, 3),
        "livenessProbe": probe("/live", 10, 3),
        "resources": {
            "requests": {
                "cpu": a.cpu_request.as_deref().unwrap_or(CPU_REQUEST),
                "memory": a.memory_request.as_deref().unwrap_or(MEMORY_REQUEST),
            },
            "limits": {
                "cpu": a.cpu_limit.as_deref().unwrap_or(CPU_LIMIT),
                "memory": a.memory_limit.as_deref().unwrap_or(MEMORY_LIMIT),
            },
        },
        "securityContext": security_context(),
        "volumeMounts": mounts,
    });
    if !legacy {
        c["restartPolicy"] = json!("Always");
    }
    c
}

fn security_context() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "readOnlyRootFilesystem": true,
        "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

fn prepend(pod: &mut Map<String, Value>, key: &str, item: Value) -> Result<(), String> {
    let slot = pod.entry(key).or_insert_with(|| Value::Array(vec![]));
    match slot {
        Value::Array(list) => list.insert(0, item),
        Value::Null => *slot = Value::Array(vec![item]),
        _ => return Err(format!("spec.{key}: expected a list")),
    }
    Ok(())
}

fn add_env(c: &mut Map<String, Value>, vars: &[(&str, String)]) -> Result<(), String> {
    let slot = c.entry("env").or_insert_with(|| Value::Array(vec![]));
    if slot.is_null() {
        *slot = Value::Array(vec![]);
    }
    let Value::Array(env) = slot else {
        return Err("env: expected a list".into());
    };
    for (name, value) in vars {
        if !env
            .iter()
            .any(|e| e.get("name").and_then(Value::as_str) == Some(name))
        {
            env.push(json!({"name": name, "value": value}));
        }
    }
    Ok(())
}

fn add_mount(
    c: &mut Map<String, Value>,
    volume: &str,
    path: &str,
    read_only: bool,
) -> Result<(), String> {
    let slot = c
        .entry("volumeMounts")
        .or_insert_with(|| Value::Array(vec![]));
    if slot.is_null() {
        *slot = Value::Array(vec![]);
    }
    let Value::Array(mounts) = slot else {
        return Err("volumeMounts: expected a list".into());
    };
    if mounts
        .iter()
        .any(|m| m.get("mountPath").and_then(Value::as_str) == Some(path))
    {
        return Err(format!(
            "volumeMounts: {path} is mounted already (Outrigger's mount path)"
        ));
    }
    let mut m = json!({"name": volume, "mountPath": path});
    if read_only {
        m["readOnly"] = json!(true);
    }
    mounts.push(m);
    Ok(())
}

/// Legacy mode: the app's command runs behind `outrigger wait` (with `--shutdown` in a pod that
/// runs to completion, so the sidecar stops when the app is done).
fn wrap_command(c: &mut Map<String, Value>, job: bool) -> Result<(), String> {
    let command = match c.get("command") {
        Some(Value::Array(cmd)) if !cmd.is_empty() => cmd.clone(),
        _ => {
            return Err(
                ": --legacy puts `outrigger wait` in front of the container's command, and it has none; set command (the image's ENTRYPOINT)"
                    .into(),
            );
        }
    };
    let mut wrapped = vec![json!(format!("{BIN_DIR}/outrigger")), json!("wait")];
    if job {
        wrapped.push(json!("--shutdown"));
    }
    wrapped.push(json!("--"));
    wrapped.extend(command);
    c.insert("command".into(), Value::Array(wrapped));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grace_period_follows_the_annotation_and_the_pod_never_shrinks() {
        let pod = |g: Option<u64>| {
            let mut m = Map::new();
            if let Some(g) = g {
                m.insert("terminationGracePeriodSeconds".into(), json!(g));
            }
            m
        };
        let ann = |s: Option<u64>| Annotations {
            shutdown_grace_seconds: s,
            ..Annotations::default()
        };
        // (annotation, pod's) → (sidecar's, pod's)
        for (a, p, want) in [
            (None, None, (30, 30)),
            (None, Some(60), (60, 60)),
            (Some(90), None, (90, 90)),
            (Some(10), None, (10, 30)),
            (Some(10), Some(60), (10, 60)),
            (Some(90), Some(60), (90, 90)),
            (None, Some(0), (1, 1)),
        ] {
            assert_eq!(
                grace_seconds(&ann(a), &pod(p)).unwrap(),
                want,
                "{a:?} {p:?}"
            );
        }
    }
}
