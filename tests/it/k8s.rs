//! `outrigger inject` and `outrigger injector`, run as the real binary: golden files per
//! workload kind (`tests/fixtures/inject/*.yaml` → `golden/`; `OUTRIGGER_UPDATE_GOLDEN=1`
//! rewrites them), idempotence, annotations, bad input; the injected sidecar's own arguments
//! started for real; the webhook over real TLS with its JSONPatch applied; every produced and
//! shipped manifest checked by `kubernetes-validate --strict` (a venv made from
//! `tests/k8s/requirements.txt`) and the Kustomize base rendered by `kubectl kustomize`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::{BIN, Spawn, eventually, run_to_end, venv_python};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject")
}

/// Every input fixture (`*.yaml` directly in the directory), sorted.
fn inputs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    assert!(v.len() >= 8, "fixtures missing: {v:?}");
    v
}

/// `outrigger inject ARGS` with `stdin`; (exit code, stdout, stderr).
fn inject(args: &[&str], stdin: &str) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The flags a fixture is injected with: `legacy-*` with `--legacy`.
fn flags(input: &Path) -> Vec<&'static str> {
    let name = input.file_name().unwrap().to_string_lossy();
    if name.starts_with("legacy-") {
        vec!["--legacy"]
    } else {
        vec![]
    }
}

fn golden(input: &Path) -> PathBuf {
    fixtures().join("golden").join(input.file_name().unwrap())
}

/// Injects a fixture file through `-f` and returns stdout (panics with stderr on failure).
fn inject_file(input: &Path) -> String {
    let mut args = vec!["-f", input.to_str().unwrap()];
    args.extend(flags(input));
    let (code, stdout, stderr) = inject(&args, "");
    assert_eq!(code, 0, "outrigger inject {args:?}\n--- stderr\n{stderr}");
    stdout
}

#[test]
fn inject_matches_the_golden_file_of_every_workload_kind() {
    let update = std::env::var_os("OUTRIGGER_UPDATE_GOLDEN").is_some();
    for input in inputs() {
        let out = inject_file(&input);
        let path = golden(&input);
        if update {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &out).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (OUTRIGGER_UPDATE_GOLDEN=1 writes it)",
                path.display()
            )
        });
        assert_eq!(
            out,
            want,
            "{} differs from {} (review, then OUTRIGGER_UPDATE_GOLDEN=1)",
            input.display(),
            path.display()
        );
    }
}

#[test]
fn injecting_twice_changes_nothing() {
    for input in inputs() {
        let once = inject_file(&input);
        let (code, twice, stderr) = inject(&flags(&input), &once);
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(twice, once, "{}", input.display());
        assert!(!stderr.contains(": injected"), "{stderr}");
    }
}

/// The first document of `yaml` as JSON.
fn first_doc(yaml: &str) -> Value {
    let docs = outrigger::k8s::inject::parse(yaml, "test").unwrap();
    docs.into_iter().next().unwrap()
}

fn container<'a>(pod: &'a Value, list: &str, name: &str) -> &'a Value {
    pod[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} in {pod}"))
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {list} {name} in {pod}"))
}

fn env<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    c["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| &e["value"])
}

#[test]
fn annotations_are_honoured() {
    let out = first_doc(&inject_file(&fixtures().join("deployment.yaml")));
    let pod = &out["spec"]["template"]["spec"];
    let side = container(pod, "initContainers", "outrigger");
    assert_eq!(side["restartPolicy"], "Always");
    assert_eq!(side["image"], "registry.example.org/outrigger:0.1.0");
    let args: Vec<&str> = side["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for want in [
        "/etc/outrigger/outrigger.yaml",
        "runtime.shutdown_grace=90s",
        "app.address=127.0.0.1:50051",
        "app.protocol=grpc",
        "bridge.address=127.0.0.1:3500",
    ] {
        assert!(args.contains(&want), "{want} not in {args:?}");
    }
    assert_eq!(env(side, "OUTRIGGER_SERVICE").unwrap(), "checkout-api");
    assert_eq!(side["resources"]["requests"]["cpu"], "100m");
    assert_eq!(side["resources"]["limits"]["cpu"], "2");
    assert_eq!(side["resources"]["requests"]["memory"], "64Mi");
    assert_eq!(side["resources"]["limits"]["memory"], "256Mi");
    assert_eq!(pod["terminationGracePeriodSeconds"], 90);
    let volume = |name: &str| {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(
        volume("outrigger-config")["configMap"]["name"],
        "checkout-outrigger"
    );
    // The service account's identity, in the sidecar only.
    assert_eq!(
        volume("outrigger-identity")["secret"]["secretName"],
        "outrigger-identity-checkout"
    );
    assert!(
        side["volumeMounts"]
            .to_string()
            .contains("/var/run/outrigger/identity")
    );
    // Identity alone (the setup before the mesh) adds no `mesh.*` and no mesh listener, so a
    // config naming its own listener `mesh` still loads; the mesh is outrigger.dev/mesh.
    assert!(
        !side["args"].to_string().contains("mesh."),
        "{}",
        side["args"]
    );
    let sc = &side["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    let app = container(pod, "containers", "checkout");
    assert_eq!(env(app, "DAPR_GRPC_PORT").unwrap(), "50001");
    assert_eq!(env(app, "APP_ID").unwrap(), "checkout-api");
    assert_eq!(
        env(app, "OUTRIGGER_OUTBOUND_ADDRESS").unwrap(),
        "127.0.0.1:15001"
    );

    // A variable the app sets itself is kept; a longer pod grace period is kept.
    let out = first_doc(&inject_file(&fixtures().join("pod.yaml")));
    let pod = &out["spec"];
    assert_eq!(
        env(container(pod, "containers", "orders"), "DAPR_HTTP_PORT").unwrap(),
        "3600"
    );
    assert_eq!(pod["terminationGracePeriodSeconds"], 60);
    let names: Vec<&str> = pod["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["outrigger", "migrate"]);

    // inject: "false" leaves the workload alone; other kinds pass through.
    let input = std::fs::read_to_string(fixtures().join("list.yaml")).unwrap();
    let (code, out, stderr) = inject(&[], &input);
    assert_eq!(code, 0, "{stderr}");
    let list = first_doc(&out);
    assert_eq!(
        list["items"][0],
        first_doc(&input)["items"][0],
        "opted out, unchanged"
    );
    assert_eq!(list["items"][2], first_doc(&input)["items"][2]);
    assert!(
        stderr.contains("Deployment legacy-batch: skipped"),
        "{stderr}"
    );
    assert!(stderr.contains("Pod debug: injected"), "{stderr}");
}

#[test]
fn legacy_wraps_the_app_and_jobs_stop_their_sidecar() {
    let out = first_doc(&inject_file(&fixtures().join("legacy-job.yaml")));
    let pod = &out["spec"]["template"]["spec"];
    assert_eq!(
        container(pod, "containers", "report")["command"],
        serde_json::json!([
            "/outrigger/outrigger",
            "wait",
            "--shutdown",
            "--",
            "python3",
            "report.py"
        ])
    );
    let side = container(pod, "containers", "outrigger");
    assert!(side.get("restartPolicy").is_none());
    assert_eq!(
        container(pod, "initContainers", "outrigger-install")["args"],
        serde_json::json!(["install", "--to", "/outrigger"])
    );
    let out = first_doc(&inject_file(&fixtures().join("legacy-deployment.yaml")));
    let app = container(&out["spec"]["template"]["spec"], "containers", "checkout");
    assert_eq!(app["command"][2], "--", "no --shutdown outside Jobs: {app}");
    assert_eq!(app["args"], serde_json::json!(["--port", "50051"]));

    // What the install init container runs: a working copy of the binary.
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("bin");
    let (code, stdout, stderr) =
        run_to_end(&["install", "--to", to.to_str().unwrap()], &[], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("wrote"), "{stdout}");
    let (code, version, _) = {
        let out = Command::new(to.join("outrigger"))
            .arg("version")
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            (),
        )
    };
    assert_eq!(code, 0);
    assert!(version.starts_with("outrigger "), "{version}");
}

#[test]
fn bad_input_is_refused_with_a_located_error_and_exit_65() {
    let cases: &[(&[&str], &str, &str)] = &[
        (&[], "kind: Pod\n  spec: [\n", "stdin:"),
        (
            &[],
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations: {outrigger.dev/app-port: \"eighty\"}\nspec:\n  containers: [{name: a, image: a}]\n",
            "stdin: document 1 (Pod p): annotation outrigger.dev/app-port: expected a port 1-65535, found \"eighty\"",
        ),
        (
            &[],
            "kind: ConfigMap\napiVersion: v1\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {template: {spec: {containers: []}}}\n",
            "stdin: document 2 (Deployment d): spec.template.spec.containers: expected at least one container",
        ),
        (
            &["--legacy"],
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: a, image: a}]\n",
            "spec.containers[0]: --legacy puts `outrigger wait` in front of the container's command, and it has none",
        ),
        (
            &[],
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  hostNetwork: true\n  containers: [{name: a, image: a}]\n",
            "spec.hostNetwork: a pod on the node's network cannot have the sidecar",
        ),
        (
            &[],
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: a, image: a, ports: [{containerPort: 3500}]}]\n",
            "spec.containers[0].ports[0].containerPort: port 3500 is the bridge's in the sidecar, which shares the pod's network",
        ),
        (
            &[],
            "apiVersion: v1\nkind: Pod\nmetadata: {name: Bad_Name}\nspec:\n  containers: [{name: a, image: a}]\n",
            "is not a DNS label; set outrigger.dev/app-id",
        ),
        // A workload kind under an apiVersion inject does not know is refused, not passed on
        // without the sidecar.
        (
            &[],
            "apiVersion: extensions/v1beta1\nkind: Deployment\nmetadata: {name: old}\nspec: {template: {spec: {containers: [{name: a, image: a}]}}}\n",
            "stdin: document 1 (Deployment old): apiVersion \"extensions/v1beta1\": expected apps/v1 for a Deployment",
        ),
        (
            &[],
            "apiVersion: batch/v1beta1\nkind: CronJob\nmetadata: {name: c}\nspec: {}\n",
            "apiVersion \"batch/v1beta1\": expected batch/v1 for a CronJob",
        ),
    ];
    for (args, input, want) in cases {
        let (code, stdout, stderr) = inject(args, input);
        assert_eq!(code, 65, "{input}\n--- stderr\n{stderr}");
        assert!(stdout.is_empty(), "nothing written on error: {stdout}");
        assert!(stderr.contains(want), "{want:?} not in {stderr:?}");
    }
    let (code, _, stderr) = run_to_end(
        &["inject", "-f", "/nonexistent/x.yaml"],
        &[],
        Path::new("/"),
    );
    assert_eq!(code, 65);
    assert!(stderr.contains("/nonexistent/x.yaml"), "{stderr}");
}

/// The sidecar exactly as injected (its args and env), started for real: it binds, reports
/// ready for the app's calls, and its effective config is what the pod spec promised.
#[test]
fn the_injected_sidecar_runs_with_its_own_arguments() {
    let out = first_doc(&inject_file(&fixtures().join("replicaset.yaml")));
    let side = container(
        &out["spec"]["template"]["spec"],
        "initContainers",
        "outrigger",
    );
    let mut args: Vec<String> = side["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert_eq!(args.remove(0), "run");
    // Port 0 instead of Dapr's fixed ports (later --set wins).
    args.extend(
        [
            "--set",
            "bridge.address=127.0.0.1:0",
            "--set",
            "bridge.grpc_address=127.0.0.1:0",
        ]
        .map(String::from),
    );
    let mut env: Vec<(String, String)> = Vec::new();
    for e in side["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        if name == "OUTRIGGER_ADMIN_ADDRESS" {
            assert_eq!(e["value"], "0.0.0.0:9901");
            continue; // port 0 (Spawn's)
        }
        let value = e["value"].as_str().unwrap_or("shop"); // POD_NAMESPACE's fieldRef
        env.push((name.into(), value.into()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let sc = Spawn {
        config: "",
        args: &args,
        env: &env,
        ..Spawn::default()
    }
    .start();
    let (status, body) = eventually(Duration::from_secs(20), "/ready/outbound", || {
        let r = sc.get("/ready/outbound");
        (r.0 == 200).then_some(r)
    });
    assert_eq!(status, 200, "{body}");
    // The app (127.0.0.1:6380) is not running: the pod is not ready, the sidecar is.
    assert_eq!(sc.get("/ready").0, 503, "{}", sc.diagnostics());
    let config = &sc.get_json("/config")["config"];
    assert_eq!(config["service"], "cache");
    assert_eq!(config["app"]["address"], "127.0.0.1:6380");
    assert_eq!(config["runtime"]["shutdown_grace"], "30s");
    assert_eq!(config["bridge"]["app_id"], "cache");
    assert!(sc.bridge.is_some(), "the bridge runs\n{}", sc.diagnostics());
}

/// A pod with `outrigger.dev/mesh: "true"` (implying identity), its sidecar started with exactly the injected
/// args and env (the kubelet's part done by hand: `$(VAR)` expanded from the downward API's
/// values, the identity Secret mounted): it joins the mesh as its service account, with the
/// mesh's listeners, and needs no config file.
#[test]
fn the_injected_mesh_sidecar_joins_the_mesh() {
    let out = first_doc(&inject_file(&fixtures().join("mesh.yaml")));
    let side = container(
        &out["spec"]["template"]["spec"],
        "initContainers",
        "outrigger",
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for args in [
        &["certs", "ca", "--out", "ca"][..],
        &[
            "certs",
            "issue",
            "--ca",
            "ca",
            "--out",
            "ca",
            "--name",
            "payments",
            "--spiffe",
            "spiffe://cluster.local/ns/shop/sa/payments",
        ],
    ] {
        let (code, _, stderr) = run_to_end(args, &[], d);
        assert_eq!(code, 0, "{args:?}: {stderr}");
    }
    let secret = d.join("identity");
    std::fs::create_dir(&secret).unwrap();
    for (from, to) in [
        ("payments.crt", "tls.crt"),
        ("payments.key", "tls.key"),
        ("ca.crt", "ca.crt"),
    ] {
        std::fs::copy(d.join("ca").join(from), secret.join(to)).unwrap();
    }
    // The downward API's values, as the kubelet gives them.
    let fields = [
        ("POD_NAMESPACE", "shop"),
        ("POD_SERVICE_ACCOUNT", "payments"),
    ];
    let mut args: Vec<String> = side["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let mut a = a.as_str().unwrap().to_string();
            for (k, v) in fields {
                a = a.replace(&format!("$({k})"), v);
            }
            a.replace("/var/run/outrigger/identity", secret.to_str().unwrap())
        })
        .collect();
    assert_eq!(args.remove(0), "run");
    assert!(
        // Quoted, so that a namespace named `123` is a string too.
        args.contains(&"mesh.namespace=\"shop\"".to_string()),
        "{args:?}"
    );
    // Port 0 instead of the fixed ports (later --set wins).
    for set in [
        "bridge.address=127.0.0.1:0",
        "bridge.grpc_address=127.0.0.1:0",
        "mesh.address=127.0.0.1:0",
        "mesh.peer_port=15443",
        "mesh.outbound_address=127.0.0.1:0",
    ] {
        args.extend(["--set".to_string(), set.to_string()]);
    }
    let mut env: Vec<(String, String)> = Vec::new();
    for e in side["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        if name == "OUTRIGGER_ADMIN_ADDRESS" {
            continue; // port 0 (Spawn's)
        }
        let value = match e["value"].as_str() {
            Some(v) => v,
            None => fields.iter().find(|(k, _)| *k == name).unwrap().1,
        };
        env.push((name.into(), value.into()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let sc = Spawn {
        config: "",
        args: &args,
        env: &env,
        ..Spawn::default()
    }
    .start();
    let (status, body) = eventually(Duration::from_secs(20), "/ready/outbound", || {
        let r = sc.get("/ready/outbound");
        (r.0 == 200).then_some(r)
    });
    assert_eq!(status, 200, "{body}\n{}", sc.diagnostics());
    let config = &sc.get_json("/config")["config"];
    assert_eq!(config["mesh"]["namespace"], "shop");
    assert_eq!(config["mesh"]["service_account"], "payments");
    assert_eq!(
        config["mesh"]["peer_dns"],
        "{app_id}.{namespace}.svc.cluster.local"
    );
    assert!(sc.listeners.contains_key("mesh"), "{:?}", sc.listeners);
    assert!(
        sc.listeners.contains_key("mesh-outbound"),
        "{:?}",
        sc.listeners
    );
}

/// `kubernetes-validate` in a venv, or None when PyPI cannot be reached (loudly skipped).
fn validator() -> Option<PathBuf> {
    venv_python("tests/k8s", "the Kubernetes schema checks")
}

/// Runs `kubernetes-validate --strict -k VERSION FILES` for 1.29 and the newest version it
/// knows; panics with its output when anything fails.
fn validate(python: &Path, files: &[PathBuf]) {
    let latest = Command::new(python)
        .args([
            "-c",
            "import kubernetes_validate.utils as u; print(u.latest_version())",
        ])
        .output()
        .unwrap();
    assert!(latest.status.success());
    let latest = String::from_utf8_lossy(&latest.stdout).trim().to_string();
    for version in ["1.29", latest.as_str()] {
        let out = Command::new(python)
            .args([
                "-m",
                "kubernetes_validate",
                "--strict",
                "--quiet",
                "-k",
                version,
            ])
            .args(files)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubernetes-validate --strict -k {version} failed\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn injected_and_shipped_manifests_pass_the_strict_schema_check() {
    let Some(python) = validator() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for input in inputs() {
        let out = dir.path().join(input.file_name().unwrap());
        // kubernetes-validate has no schema for List: its items are checked one by one.
        let docs: Vec<Value> = outrigger::k8s::inject::parse(&inject_file(&input), "out")
            .unwrap()
            .into_iter()
            .flat_map(|d| match d["items"].as_array() {
                Some(items) if d["kind"] == "List" => items.clone(),
                _ => vec![d],
            })
            .collect();
        std::fs::write(&out, outrigger::k8s::inject::render(&docs)).unwrap();
        files.push(out);
    }
    files.extend(shipped_manifests());
    validate(&python, &files);
}

/// Every Kubernetes manifest under `deploy/kubernetes` (not Kustomize's own files, nor
/// Outrigger configs for ConfigMaps: `outrigger check` reads those).
fn shipped_manifests() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "yaml")
                && p.file_name()
                    .is_some_and(|n| n != "kustomization.yaml" && n != "outrigger.yaml")
            {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// `outrigger injector` on port 0 with a certificate from `outrigger certs`; killed on drop.
struct Injector {
    child: std::process::Child,
    dir: tempfile::TempDir,
    url: String,
    client: reqwest::blocking::Client,
}

impl Injector {
    fn start() -> Injector {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for args in [
            &["certs", "ca", "--out", "certs"][..],
            &[
                "certs",
                "issue",
                "--ca",
                "certs",
                "--out",
                "certs",
                "--name",
                "injector",
                "--dns",
                "localhost",
                "--ip",
                "127.0.0.1",
            ],
        ] {
            let (code, _, stderr) = run_to_end(args, &[], d);
            assert_eq!(code, 0, "{args:?}: {stderr}");
        }
        let listeners = d.join("listeners.json");
        let child = Command::new(BIN)
            .args([
                "injector",
                "--cert",
                "certs/injector.crt",
                "--key",
                "certs/injector.key",
                "--address",
                "127.0.0.1:0",
                "--listeners-file",
            ])
            .arg(&listeners)
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(d.join("stdout")).unwrap())
            .stderr(std::fs::File::create(d.join("stderr")).unwrap())
            .spawn()
            .unwrap();
        let mut injector = Injector {
            child,
            url: String::new(),
            client: reqwest::blocking::Client::builder()
                .add_root_certificate(
                    reqwest::Certificate::from_pem(&std::fs::read(d.join("certs/ca.crt")).unwrap())
                        .unwrap(),
                )
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            dir,
        };
        let address = eventually(Duration::from_secs(20), "the injector binds", || {
            if let Some(status) = injector.child.try_wait().unwrap() {
                panic!("injector exited ({status})\n{}", injector.stderr());
            }
            let text = std::fs::read_to_string(&listeners).ok()?;
            let v: Value = serde_json::from_str(&text).unwrap();
            Some(v["injector"].as_str().unwrap().to_string())
        });
        let port = address.rsplit(':').next().unwrap();
        injector.url = format!("https://localhost:{port}");
        injector
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// POSTs `body` to /inject; (status, the answer as JSON).
    fn review(&self, body: &str) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}/inject", self.url))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap_or_else(|e| panic!("POST /inject: {e}\n{}", self.stderr()));
        let status = r.status().as_u16();
        let text = r.text().unwrap();
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {text}\n{}", self.stderr()));
        (status, v)
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An AdmissionReview v1 request for creating `object`, in the shape the Kubernetes docs give.
fn review_of(uid: &str, object: &Value) -> String {
    serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        }
    })
    .to_string()
}

#[test]
fn the_webhook_answers_over_tls_with_the_patch_inject_would_make() {
    let injector = Injector::start();
    let health = injector
        .client
        .get(format!("{}/healthz", injector.url))
        .send()
        .unwrap();
    assert_eq!(health.status(), 200);

    let input = std::fs::read_to_string(fixtures().join("pod.yaml")).unwrap();
    let pod = first_doc(&input);
    let (status, answer) = injector.review(&review_of("uid-1", &pod));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert_eq!(response["uid"], "uid-1");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    use base64::Engine;
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).unwrap();
    let injected = first_doc(&inject_file(&fixtures().join("pod.yaml")));
    assert_eq!(patched, injected, "the webhook and inject differ");

    // Injected already: admitted, no patch.
    let (status, answer) = injector.review(&review_of("uid-2", &injected));
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none(), "{answer}");

    // A pod it cannot inject: admitted unchanged, with a warning saying why.
    let mut bad = pod.clone();
    bad["metadata"]["annotations"] = serde_json::json!({"outrigger.dev/memory-limit": "lots"});
    let (status, answer) = injector.review(&review_of("uid-3", &bad));
    assert_eq!(status, 200);
    let r = &answer["response"];
    assert_eq!(r["allowed"], true);
    assert!(r.get("patch").is_none(), "{answer}");
    let warning = r["warnings"][0].as_str().unwrap();
    assert!(
        warning.contains("admitted without the sidecar")
            && warning.contains("outrigger.dev/memory-limit: expected a resource quantity"),
        "{warning}"
    );

    // Malformed reviews: a clear AdmissionReview error, and the injector keeps serving.
    for (body, want) in [
        (
            "this is not json",
            "malformed AdmissionReview: the body is not JSON",
        ),
        (
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
            "request.uid: missing",
        ),
        (
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","operation":"CREATE"}}"#,
            "request.object: expected the object being created",
        ),
    ] {
        let (status, answer) = injector.review(body);
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(answer["response"]["allowed"], false);
        let message = answer["response"]["status"]["message"].as_str().unwrap();
        assert!(message.contains(want), "{want:?} not in {message:?}");
    }
    let (status, _) = injector.review(&review_of("uid-4", &pod));
    assert_eq!(status, 200, "still serving after malformed reviews");

    // A pod made by a ReplicaSet has no name yet (generateName): its app id is its label.
    let made = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "web-5d8f7c9b4-", "namespace": "shop",
                     "labels": {"app": "web", "pod-template-hash": "5d8f7c9b4"}},
        "spec": {"containers": [{"name": "web", "image": "example/web:1"}]},
    });
    let (status, answer) = injector.review(&review_of("uid-5", &made));
    assert_eq!(status, 200);
    let patch = base64::engine::general_purpose::STANDARD
        .decode(answer["response"]["patch"].as_str().unwrap())
        .unwrap();
    let mut patched = made.clone();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    json_patch::patch(&mut patched, &patch).unwrap();
    let app = container(&patched["spec"], "containers", "web");
    assert_eq!(env(app, "APP_ID").unwrap(), "web");
    let side = container(&patched["spec"], "initContainers", "outrigger");
    assert_eq!(env(side, "OUTRIGGER_SERVICE").unwrap(), "web");
    assert!(
        injector.stderr().contains("review answered"),
        "{}",
        injector.stderr()
    );
}

#[test]
fn the_webhook_stops_on_sigterm() {
    let mut injector = Injector::start();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(injector.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = eventually(Duration::from_secs(10), "the injector exits", || {
        injector.child.try_wait().unwrap()
    });
    assert!(status.success(), "{status}\n{}", injector.stderr());
}

/// `kubectl kustomize DIR` (Debian's or any kubectl; `.ci/run` installs it).
fn kustomize(dir: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&path)
        .output()
        .expect("kubectl is installed (for kubectl kustomize)");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The Kustomize bases render; the example, injected as the webhook would, passes the schema
/// check, and its ConfigMap config with the injected sidecar's arguments passes `outrigger check`.
#[test]
fn the_kustomize_bases_render_and_the_injected_example_is_valid() {
    let injector = kustomize("deploy/kubernetes/injector");
    let example = kustomize("deploy/kubernetes/example");
    let (code, injected, stderr) = inject(&[], &example);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("Deployment outrigger-demo/sample: injected"),
        "{stderr}"
    );

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert_eq!(
        std::fs::read_to_string(root.join("deploy/kubernetes/example/app.py")).unwrap(),
        std::fs::read_to_string(root.join("examples/app.py")).unwrap(),
        "deploy/kubernetes/example/app.py must be a copy of examples/app.py"
    );

    let docs = outrigger::k8s::inject::parse(&injected, "example").unwrap();
    let config = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "sample-outrigger")
        .expect("the sidecar's ConfigMap, named as the annotation says");
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let side = container(
        &deployment["spec"]["template"]["spec"],
        "initContainers",
        "outrigger",
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("outrigger.yaml");
    std::fs::write(&file, config["data"]["outrigger.yaml"].as_str().unwrap()).unwrap();
    let mut args: Vec<String> = side["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap()
                .replace("/etc/outrigger/outrigger.yaml", file.to_str().unwrap())
        })
        .collect();
    args[0] = "check".into();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, effective, stderr) =
        run_to_end(&args, &[("OUTRIGGER_SERVICE", "sample")], dir.path());
    assert_eq!(code, 0, "outrigger {args:?}\n{stderr}");
    assert!(effective.contains("shutdown_grace: 20s"), "{effective}");

    let Some(python) = validator() else { return };
    let mut files = Vec::new();
    for (name, text) in [
        ("injector.yaml", &injector),
        ("example.yaml", &example),
        ("example-injected.yaml", &injected),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        files.push(p);
    }
    validate(&python, &files);
}

/// The other orchestrators' recipes hold configs Outrigger accepts: the ECS task definition's
/// sidecar command and the Nomad job's config template pass `outrigger check`. (Nomad and ECS
/// themselves are not here to run them.)
#[test]
fn the_nomad_and_ecs_recipes_hold_valid_configs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let dir = tempfile::tempdir().unwrap();

    let ecs: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("ecs/task-definition.json")).unwrap(),
    )
    .unwrap();
    let side = ecs["containerDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "outrigger")
        .unwrap();
    let app = ecs["containerDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "app")
        .unwrap();
    assert_eq!(
        app["dependsOn"][0],
        serde_json::json!({"containerName": "outrigger", "condition": "HEALTHY"})
    );
    let mut args: Vec<&str> = side["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "run");
    args[0] = "check";
    let (code, _, stderr) = run_to_end(&args, &[("OUTRIGGER_SERVICE", "sample")], dir.path());
    assert_eq!(code, 0, "ECS: outrigger {args:?}\n{stderr}");

    let hcl = std::fs::read_to_string(root.join("nomad/sample.nomad.hcl")).unwrap();
    assert!(
        hcl.contains("hook    = \"prestart\"\n        sidecar = true"),
        "{hcl}"
    );
    let template = hcl
        .split("<<-EOT\n")
        .nth(1)
        .and_then(|rest| rest.split("        EOT").next())
        .expect("the config heredoc");
    let config: String = template
        .lines()
        .map(|l| l.strip_prefix("          ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let file = dir.path().join("nomad.yaml");
    std::fs::write(&file, config).unwrap();
    let (code, _, stderr) = run_to_end(&["check", "-c", file.to_str().unwrap()], &[], dir.path());
    assert_eq!(code, 0, "Nomad template\n{stderr}");
}

/// The pod specs of a document (a List's items too), with their JSON path.
fn pod_specs(doc: &Value) -> Vec<(String, Value)> {
    let path = match doc["kind"].as_str().unwrap_or("") {
        "List" => {
            return doc["items"]
                .as_array()
                .unwrap()
                .iter()
                .enumerate()
                .flat_map(|(i, item)| {
                    pod_specs(item)
                        .into_iter()
                        .map(move |(p, s)| (format!("/items/{i}{p}"), s))
                })
                .collect();
        }
        "Pod" => "/spec",
        "CronJob" => "/spec/jobTemplate/spec/template/spec",
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => "/spec/template/spec",
        _ => return vec![],
    };
    vec![(path.to_string(), doc.pointer(path).unwrap().clone())]
}

/// What injection may change in a pod spec, and nothing else: `after` minus Outrigger's
/// containers, volumes, mounts, env and wrapped command is `before`; the grace period only grows.
fn only_outrigger_was_added(before: &Value, after: &Value, what: &str) {
    if before == after {
        return; // opted out
    }
    let ours = |name: &str| name.starts_with("outrigger");
    let added_env = [
        "OUTRIGGER_ADMIN_ADDRESS",
        "APP_ID",
        "DAPR_HTTP_PORT",
        "DAPR_GRPC_PORT",
        "DAPR_HTTP_ENDPOINT",
        "DAPR_GRPC_ENDPOINT",
        "OUTRIGGER_OUTBOUND_ADDRESS",
    ];
    let list = |v: &Value, key: &str| v[key].as_array().cloned().unwrap_or_default();
    let mut rest = after.as_object().unwrap().clone();
    let grace_before = before["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or(30);
    assert!(
        rest["terminationGracePeriodSeconds"].as_u64().unwrap() >= grace_before,
        "{what}"
    );
    rest.remove("terminationGracePeriodSeconds");
    for key in ["volumes", "initContainers"] {
        let kept: Vec<Value> = list(after, key)
            .into_iter()
            .filter(|v| !ours(v["name"].as_str().unwrap()))
            .collect();
        assert_eq!(kept, list(before, key), "{what}: {key}");
        rest.remove(key);
    }
    let app: Vec<Value> = list(after, "containers")
        .into_iter()
        .filter(|c| c["name"] != "outrigger")
        .collect();
    let was = list(before, "containers");
    assert_eq!(app.len(), was.len(), "{what}: containers");
    for (now, was) in app.iter().zip(&was) {
        let mut now = now.as_object().unwrap().clone();
        let mut was = was.as_object().unwrap().clone();
        let env_was = list(&Value::Object(was.clone()), "env");
        let env_now = list(&Value::Object(now.clone()), "env");
        assert_eq!(
            env_now[..env_was.len()],
            env_was[..],
            "{what}: env kept, in order"
        );
        for e in &env_now[env_was.len()..] {
            assert!(
                added_env.contains(&e["name"].as_str().unwrap()),
                "{what}: {e}"
            );
        }
        let mounts_was = list(&Value::Object(was.clone()), "volumeMounts");
        let mounts_now = list(&Value::Object(now.clone()), "volumeMounts");
        assert_eq!(
            mounts_now[..mounts_was.len()],
            mounts_was[..],
            "{what}: mounts"
        );
        for m in &mounts_now[mounts_was.len()..] {
            assert!(ours(m["name"].as_str().unwrap()), "{what}: {m}");
        }
        if let (Some(c_now), Some(c_was)) = (now.get("command"), was.get("command")) {
            let (c_now, c_was) = (c_now.as_array().unwrap(), c_was.as_array().unwrap());
            assert!(
                c_now.ends_with(c_was),
                "{what}: the app's command is kept at the end"
            );
        }
        for key in ["env", "volumeMounts", "command"] {
            now.remove(key);
            was.remove(key);
        }
        assert_eq!(now, was, "{what}: the rest of the container");
    }
    rest.remove("containers");
    let mut before_rest = before.as_object().unwrap().clone();
    for key in [
        "terminationGracePeriodSeconds",
        "volumes",
        "initContainers",
        "containers",
    ] {
        before_rest.remove(key);
    }
    assert_eq!(rest, before_rest, "{what}: the rest of the pod spec");
}

#[test]
fn everything_else_in_the_documents_is_kept() {
    for input in inputs() {
        let text = std::fs::read_to_string(&input).unwrap();
        let before = outrigger::k8s::inject::parse(&text, "in").unwrap();
        let after = outrigger::k8s::inject::parse(&inject_file(&input), "out").unwrap();
        assert_eq!(before.len(), after.len(), "{}", input.display());
        for (b, a) in before.iter().zip(&after) {
            let what = format!(
                "{} {}",
                input.display(),
                outrigger::k8s::inject::describe(b)
            );
            let (specs_b, specs_a) = (pod_specs(b), pod_specs(a));
            assert_eq!(specs_b.len(), specs_a.len(), "{what}");
            let mut a_rest = a.clone();
            for ((path, sb), (_, sa)) in specs_b.iter().zip(&specs_a) {
                only_outrigger_was_added(sb, sa, &what);
                *a_rest.pointer_mut(path).unwrap() = sb.clone();
            }
            assert_eq!(&a_rest, b, "{what}: outside the pod specs");
        }
    }
}

/// The mesh config of docs/kubernetes.md (a ConfigMap tuning `mesh:`), with the `--set`s
/// inject writes for identity and certificates laid out as the Secret `outrigger-identity-SA`
/// mounts them (made by `outrigger certs` as the guide says), passes `outrigger check`, which
/// loads every certificate and key and checks the SPIFFE ID.
#[test]
fn the_documented_identity_config_loads_the_secret_layout() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let guide = std::fs::read_to_string(root.join("docs/kubernetes.md")).unwrap();
    let snippet = guide
        .split("tune the mesh; the injected")
        .nth(1)
        .and_then(|rest| rest.split("```yaml\n").nth(1))
        .and_then(|rest| rest.split("```").next())
        .expect("the mesh config in docs/kubernetes.md");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for args in [
        &[
            "certs",
            "ca",
            "--out",
            "ca",
            "--trust-domain",
            "cluster.local",
        ][..],
        &[
            "certs",
            "issue",
            "--ca",
            "ca",
            "--out",
            "ca",
            "--name",
            "checkout",
            "--spiffe",
            "spiffe://cluster.local/ns/shop/sa/checkout",
        ],
    ] {
        let (code, _, stderr) = run_to_end(args, &[], d);
        assert_eq!(code, 0, "{args:?}: {stderr}");
    }
    let secret = d.join("identity");
    std::fs::create_dir(&secret).unwrap();
    for (from, to) in [
        ("checkout.crt", "tls.crt"),
        ("checkout.key", "tls.key"),
        ("ca.crt", "ca.crt"),
    ] {
        std::fs::copy(d.join("ca").join(from), secret.join(to)).unwrap();
    }
    std::fs::write(d.join("outrigger.yaml"), snippet).unwrap();
    // app.address comes from outrigger.dev/app-port, the mesh's identity from the pod, as
    // injected.
    let identity_dir = format!("mesh.identity_dir={}", secret.display());
    let args = [
        "check",
        "-c",
        "outrigger.yaml",
        "--set",
        "app.address=127.0.0.1:8080",
        "--set",
        "mesh.namespace=shop",
        "--set",
        "mesh.service_account=checkout",
        "--set",
        &identity_dir,
    ];
    let (code, stdout, stderr) = run_to_end(&args, &[], d);
    assert_eq!(code, 0, "{snippet}\n{stderr}");
    assert!(stdout.contains("require_peer_namespace: true"), "{stdout}");
    // A Secret of another service account is refused.
    let mut wrong = args;
    wrong[8] = "mesh.service_account=payments";
    let (code, _, stderr) = run_to_end(&wrong, &[], d);
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("not this workload's SPIFFE ID spiffe://cluster.local/ns/shop/sa/payments"),
        "{stderr}"
    );
}

/// A kind inject does not know that has a pod template (a custom resource) passes through
/// unchanged, with a warning on stderr naming it; other kinds pass silently. Values a YAML 1.1
/// reader would take for numbers or dates stay quoted strings in the output.
#[test]
fn unknown_kinds_with_pod_templates_are_reported_and_strings_stay_strings() {
    let input = "apiVersion: argoproj.io/v1alpha1\nkind: Rollout\nmetadata: {name: r}\nspec:\n  template:\n    spec:\n      containers: [{name: a, image: a}]\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {mode: \"0o755\", bits: \"0b101\", n: \"1_000\", day: \"2001-12-14\", hex: \"+0x1F\", on: \"yes\"}\n";
    let (code, stdout, stderr) = inject(&[], input);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("Rollout r: warning: not injected: kind \"Rollout\" apiVersion \"argoproj.io/v1alpha1\" has a pod template"),
        "{stderr}"
    );
    assert!(!stderr.contains("ConfigMap"), "{stderr}");
    for want in [
        "mode: \"0o755\"",
        "bits: \"0b101\"",
        "\"n\": \"1_000\"",
        "day: \"2001-12-14\"",
        "hex: \"+0x1F\"",
        "\"on\": \"yes\"",
    ] {
        assert!(stdout.contains(want), "{want:?} not in\n{stdout}");
    }
    let docs: Vec<Value> = outrigger::k8s::inject::parse(&stdout, "out").unwrap();
    assert!(
        docs[0]
            .pointer("/spec/template/spec/initContainers")
            .is_none()
    );
}
