//! The `outrigger` command line: parses arguments, loads the config, runs the sidecar.
//! Exit codes: 0 ok, 64 usage, 65 `inject` input, 78 config (nothing was started), the app's
//! code in supervision mode, 1 for any other failure.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use outrigger::config::{self, ProcessEnv, Source};

#[cfg(feature = "alloc-count")]
mod counting_alloc;
/// Bench builds only: every heap allocation counted (see `counting_alloc.rs`).
#[cfg(feature = "alloc-count")]
#[global_allocator]
static ALLOCATOR: counting_alloc::Counting = counting_alloc::Counting;

/// Exit code for a command-line usage error (sysexits EX_USAGE).
const EX_USAGE: u8 = 64;
/// Exit code for an invalid configuration (sysexits EX_CONFIG).
const EX_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "outrigger",
    version,
    about = "One small sidecar for proxying, TLS, telemetry, lifecycle, reloads and a Dapr-compatible API",
    after_help = "Examples:\n  \
        outrigger run                                   admin only, embedded defaults\n  \
        outrigger run -c outrigger.yaml -- python3 app.py   supervise an app\n  \
        outrigger check -c outrigger.yaml               validate and print the effective config\n  \
        outrigger run -c f.yaml --set admin.address=127.0.0.1:9902\n\n\
        Docs: docs/configuration.md"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar (and the app after `--`, if given).
    #[command(after_help = "Example:\n  outrigger run -c outrigger.yaml -- python3 app.py")]
    Run(RunArgs),
    /// Validate a config and print the effective config (secrets redacted); exit 78 if invalid.
    #[command(after_help = "Example:\n  outrigger check -c outrigger.yaml --set log.level=debug")]
    Check(ConfigArgs),
    /// Wait until the sidecar is ready for the app's calls, then run CMD (for an app in its own
    /// container); with --shutdown, stop the sidecar when CMD ends. Exit 69 if not ready in time.
    #[command(
        after_help = "Examples:\n  outrigger wait -- python3 app.py\n  outrigger wait --shutdown --timeout 2m -- ./batch-job"
    )]
    Wait(WaitArgs),
    /// Create a development CA and workload certificates with SPIFFE IDs (for quick starts and
    /// tests, not production).
    #[command(
        subcommand,
        after_help = "Examples:\n  outrigger certs ca --out certs\n  \
            outrigger certs issue --ca certs --out certs --name web --spiffe spiffe://example.org/ns/shop/sa/web --dns localhost"
    )]
    Certs(CertsCommand),
    /// Add Outrigger to Kubernetes manifests as a native sidecar (Pod, Deployment, StatefulSet,
    /// DaemonSet, ReplicaSet, Job, CronJob, List); other documents pass through. Exit 65 on
    /// input that is not YAML or a workload that cannot be injected.
    #[cfg(feature = "k8s")]
    #[command(
        after_help = "Examples:\n  outrigger inject -f deploy.yaml | kubectl apply -f -\n  \
            kubectl get deploy web -o yaml | outrigger inject --legacy\n\n\
            Annotations (pod template): outrigger.dev/inject, app-id, config, app-port, app-protocol, bridge,\n\
            outbound-address, shutdown-grace, image, identity, cpu-request, cpu-limit, memory-request,\n\
            memory-limit.\n\
            Docs: docs/kubernetes.md"
    )]
    Inject(InjectArgs),
    /// Serve the mutating admission webhook (AdmissionReview v1 over HTTPS on /inject), which
    /// injects pods as they are created, with the same code as `inject`.
    #[cfg(feature = "k8s")]
    #[command(
        after_help = "Example:\n  outrigger injector --cert /tls/tls.crt --key /tls/tls.key --address 0.0.0.0:8443"
    )]
    Injector(InjectorArgs),
    /// Copy this binary to DIR/outrigger (for `outrigger wait` in an app container whose image
    /// lacks it: the legacy Kubernetes pattern).
    #[command(after_help = "Example:\n  outrigger install --to /outrigger")]
    Install(InstallArgs),
    /// Print the version and the compiled-in modules.
    Version,
}

#[cfg(feature = "k8s")]
#[derive(Args)]
struct InjectOptionArgs {
    /// The sidecar image (the outrigger.dev/image annotation wins).
    #[arg(long, default_value = outrigger::k8s::sidecar::DEFAULT_IMAGE, value_name = "IMAGE")]
    image: String,
    /// For clusters older than 1.29: a regular sidecar container, and `outrigger wait` in
    /// front of each app container's command.
    #[arg(long)]
    legacy: bool,
}

#[cfg(feature = "k8s")]
#[derive(Args)]
struct InjectArgs {
    /// The manifests to read; `-` or none: stdin.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    file: Option<PathBuf>,
    #[command(flatten)]
    options: InjectOptionArgs,
}

#[cfg(feature = "k8s")]
#[derive(Args)]
struct InjectorArgs {
    /// Where to listen (HTTPS).
    #[arg(long, default_value = "0.0.0.0:8443", value_name = "ADDRESS")]
    address: std::net::SocketAddr,
    /// The serving certificate chain (PEM), valid for the webhook Service's DNS name.
    #[arg(long, value_name = "FILE")]
    cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Write {"injector": "ADDRESS"} to this file once bound.
    #[arg(long, value_name = "FILE")]
    listeners_file: Option<PathBuf>,
    /// Log filter.
    #[arg(long, default_value = "info", value_name = "FILTER")]
    log_level: String,
    #[command(flatten)]
    options: InjectOptionArgs,
}

#[derive(Args)]
struct InstallArgs {
    /// The directory to copy the binary into (created if missing).
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
}

#[derive(Args)]
struct ConfigArgs {
    /// Config file (YAML). Without it, the embedded defaults.
    #[arg(
        short = 'c',
        long = "config",
        env = "OUTRIGGER_CONFIG",
        value_name = "FILE"
    )]
    config: Option<PathBuf>,
    /// Override a config key, e.g. --set admin.address=127.0.0.1:9902 (repeatable; wins over
    /// the file and OUTRIGGER_* variables).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = config::parse_set)]
    sets: Vec<(String, String)>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Log filter, like info or info,outrigger=debug (same as --set log.level=...).
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// Log format for Outrigger's own logs (same as --set log.format=...).
    #[arg(long, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormatArg>,
    /// Write the bound listener addresses as JSON to this file once all are bound.
    #[arg(long, value_name = "FILE")]
    listeners_file: Option<PathBuf>,
    /// Take over from the running Outrigger (hot restart): its listening sockets and its app,
    /// with no refused connection; it drains and exits once this one is ready.
    #[arg(long)]
    upgrade: bool,
    /// The running Outrigger's upgrade socket (default: runtime.upgrade_socket, or
    /// outrigger-<admin port>.upgrade in $XDG_RUNTIME_DIR or /tmp).
    #[arg(long, value_name = "PATH")]
    upgrade_socket: Option<PathBuf>,
    /// The app to run and supervise, after `--`.
    #[arg(last = true, value_name = "APP ARGS")]
    app: Vec<String>,
}

#[derive(Args)]
struct WaitArgs {
    /// The sidecar's admin address (host:port or unix:/path).
    #[arg(
        long,
        env = "OUTRIGGER_ADMIN_ADDRESS",
        default_value = "127.0.0.1:9901",
        value_name = "ADDRESS",
        value_parser = parse_address
    )]
    admin: outrigger::config::Address,
    /// Give up after this long (exit 69).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    timeout: std::time::Duration,
    /// Run CMD as a child (signals passed on) and ask the sidecar to stop when it ends.
    #[arg(long)]
    shutdown: bool,
    /// The command to run once the sidecar is ready, after `--`. Without it, just wait.
    #[arg(last = true, value_name = "CMD ARGS")]
    command: Vec<String>,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a self-signed CA: DIR/ca.crt and DIR/ca.key (never replaces an existing ca.key).
    Ca(CaArgs),
    /// Issue a workload certificate signed by the CA, for TLS server and client use.
    ///
    /// Writes DIR/NAME.crt (the leaf, then the CA) and DIR/NAME.key. Give at least one of
    /// --spiffe, --dns, --ip.
    #[command(group = clap::ArgGroup::new("names").required(true).multiple(true))]
    Issue(IssueArgs),
}

#[derive(Args)]
struct CaArgs {
    /// Directory to write ca.crt and ca.key into (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// The SPIFFE trust domain this CA is for (shown in its name).
    #[arg(long, default_value = "example.org", value_name = "DOMAIN")]
    trust_domain: String,
    /// Days the CA is valid.
    #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..))]
    days: u32,
}

#[derive(Args)]
struct IssueArgs {
    /// Directory holding the CA's ca.crt and ca.key.
    #[arg(long = "ca", value_name = "DIR")]
    ca_dir: PathBuf,
    /// Directory to write NAME.crt and NAME.key into (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// File name for the certificate and key, without extension.
    #[arg(long, value_name = "NAME")]
    name: String,
    /// SPIFFE ID as a URI SAN, e.g. spiffe://example.org/ns/shop/sa/web.
    #[arg(long, value_name = "URI", group = "names", value_parser = parse_spiffe_id)]
    spiffe: Option<String>,
    /// DNS name SAN (repeatable); the first is also the subject's common name.
    #[arg(long, value_name = "NAME", group = "names")]
    dns: Vec<String>,
    /// IP address SAN (repeatable).
    #[arg(long = "ip", value_name = "IP", group = "names")]
    ips: Vec<std::net::IpAddr>,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..))]
    days: u32,
    /// Key algorithm.
    #[arg(long, value_enum, default_value = "ecdsa", value_name = "KIND")]
    key: KeyArg,
    /// Issue a certificate that expired yesterday (for testing how peers reject it).
    #[arg(long)]
    expired: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KeyArg {
    /// ECDSA P-256
    Ecdsa,
    Ed25519,
    /// RSA 2048
    Rsa,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Human,
    Json,
}

fn parse_address(s: &str) -> Result<outrigger::config::Address, String> {
    s.parse()
        .map_err(|()| format!("expected host:port or unix:/path, found {s:?}"))
}

fn parse_spiffe_id(s: &str) -> Result<String, String> {
    outrigger::tls::certs::check_spiffe_id(s).map_err(|e| format!("{e:#}"))?;
    Ok(s.to_string())
}

fn source(args: &ConfigArgs) -> Source {
    Source {
        file: args.config.clone(),
        sets: args.sets.clone(),
        app_command: None,
    }
}

fn main() -> ExitCode {
    tune_allocator();
    outrigger::tls::install_process_provider();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EX_USAGE),
            };
        }
    };
    match cli.command {
        Command::Version => {
            let features = if outrigger::FEATURES.is_empty() {
                "none yet".to_string()
            } else {
                outrigger::FEATURES.join(", ")
            };
            println!(
                "outrigger {} (modules: {features})",
                env!("CARGO_PKG_VERSION")
            );
            ExitCode::SUCCESS
        }
        Command::Check(args) => match outrigger::preflight::load(&source(&args), &ProcessEnv) {
            Ok((c, _built)) => {
                if let Some(m) = &c.mesh {
                    for w in m.warnings(c.app.address.is_some()) {
                        eprintln!("warning: {w}");
                    }
                }
                print!("{}", c.to_yaml());
                eprintln!("configuration is valid");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("error: {e}");
                ExitCode::from(EX_CONFIG)
            }
        },
        Command::Run(args) => run(args),
        Command::Wait(args) => {
            let options = outrigger::lifecycle::wait::WaitOptions {
                admin: args.admin,
                timeout: args.timeout,
                shutdown: args.shutdown,
                command: args.command,
            };
            match outrigger::lifecycle::wait::run(options) {
                Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Certs(command) => certs(command),
        #[cfg(feature = "k8s")]
        Command::Inject(args) => inject(args),
        #[cfg(feature = "k8s")]
        Command::Injector(args) => {
            outrigger::telemetry::log::init(&args.log_level, Default::default());
            let options = outrigger::k8s::injector::InjectorOptions {
                address: args.address,
                cert: args.cert,
                key: args.key,
                inject: inject_options(args.options),
                listeners_file: args.listeners_file,
            };
            match outrigger::k8s::injector::run(options) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Install(args) => match outrigger::lifecycle::wait::install(&args.to) {
            Ok(path) => {
                println!("wrote {}", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

#[cfg(feature = "k8s")]
fn inject_options(args: InjectOptionArgs) -> outrigger::k8s::sidecar::Options {
    outrigger::k8s::sidecar::Options {
        image: args.image,
        legacy: args.legacy,
    }
}

/// Exit code for input that is not what was expected (sysexits EX_DATAERR).
#[cfg(feature = "k8s")]
const EX_DATAERR: u8 = 65;

#[cfg(feature = "k8s")]
fn inject(args: InjectArgs) -> ExitCode {
    use std::io::Read;
    let (text, name) = match args.file.as_deref() {
        None => (String::new(), "stdin".to_string()),
        Some(p) if p == std::path::Path::new("-") => (String::new(), "stdin".to_string()),
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => (t, p.display().to_string()),
            Err(e) => {
                eprintln!("error: read {}: {e}", p.display());
                return ExitCode::from(EX_DATAERR);
            }
        },
    };
    let text = if name == "stdin" {
        let mut t = String::new();
        if let Err(e) = std::io::stdin().read_to_string(&mut t) {
            eprintln!("error: read stdin: {e}");
            return ExitCode::from(EX_DATAERR);
        }
        t
    } else {
        text
    };
    let options = inject_options(args.options);
    match outrigger::k8s::inject::inject_text(&text, &name, &options) {
        Ok((yaml, reports)) => {
            print!("{yaml}");
            for r in reports {
                let what = match r.outcome {
                    outrigger::k8s::sidecar::Outcome::Injected => "injected".to_string(),
                    outrigger::k8s::sidecar::Outcome::AlreadyInjected => {
                        "already injected".to_string()
                    }
                    outrigger::k8s::sidecar::Outcome::OptedOut => {
                        "skipped (outrigger.dev/inject: \"false\")".into()
                    }
                    outrigger::k8s::sidecar::Outcome::NotAWorkload(why) => {
                        format!("warning: not injected: {why}")
                    }
                };
                eprintln!("{}: {what}", r.object);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EX_DATAERR)
        }
    }
}

fn certs(command: CertsCommand) -> ExitCode {
    use outrigger::tls::certs::{self, KeyKind};
    let written = match command {
        CertsCommand::Ca(args) => certs::create_ca(&certs::CaOptions {
            out: args.out,
            trust_domain: args.trust_domain,
            days: args.days,
        }),
        CertsCommand::Issue(args) => certs::issue(&certs::IssueOptions {
            ca_dir: args.ca_dir,
            out: args.out,
            name: args.name,
            spiffe: args.spiffe,
            dns: args.dns,
            ips: args.ips,
            days: args.days,
            expired: args.expired,
            key: match args.key {
                KeyArg::Ecdsa => KeyKind::Ecdsa,
                KeyArg::Ed25519 => KeyKind::Ed25519,
                KeyArg::Rsa => KeyKind::Rsa,
            },
        }),
    };
    match written {
        Ok(files) => {
            for file in files {
                println!("wrote {}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    let mut source = source(&args.config);
    if let Some(level) = &args.log_level {
        source.sets.push(("log.level".into(), level.clone()));
    }
    if let Some(format) = args.log_format {
        let f = match format {
            LogFormatArg::Human => "human",
            LogFormatArg::Json => "json",
        };
        source.sets.push(("log.format".into(), f.into()));
    }
    if !args.app.is_empty() {
        source.app_command = Some(args.app.clone());
    }
    let (config, built) = match outrigger::preflight::load(&source, &ProcessEnv) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprint!("error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    one_malloc_arena(&config);
    let log_level = outrigger::telemetry::log::init(&config.log.level, config.log.format);
    let options = outrigger::app::RunOptions {
        source,
        listeners_file: args.listeners_file,
        log_level,
        upgrade: args.upgrade,
        upgrade_socket: args.upgrade_socket,
    };
    start_trimmer();
    match outrigger::app::run(config, built, options) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "outrigger failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Keeps glibc malloc from handing memory back to the kernel after every burst. Under proxy load
/// its default (dynamic) trim threshold made it shrink and regrow the heap with `brk` every few
/// requests, which cost about a quarter of the throughput (docs/BENCHMARKS.md). Freed memory
/// stays in the process for reuse instead; peak RSS is unchanged and idle RSS stays small. A
/// different allocator (mimalloc) fixed the churn too but doubled idle RSS.
///
/// Not set here, because `mallopt` has no parameter for it: glibc's per-thread cache. It once
/// doubled the heap under h2c load; measured again with a re-exec that set
/// `GLIBC_TUNABLES=glibc.malloc.tcache_count=0` (docs/BENCHMARKS.md, "RSS under load: start-up's
/// code pages"), it changed nothing any more (h2c anonymous 4.1–4.5 MiB either way at 32
/// streams, ~25 MiB either way at 512), so no re-exec. `GLIBC_TUNABLES` set on the sidecar
/// still works (a supervised app inherits it; `app.env: { GLIBC_TUNABLES: "" }` undoes that).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: mallopt only changes allocator tunables; it is called first thing in main,
    // before any other thread exists or any allocation depends on these settings.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        // Grow the heap in 1 MiB steps: without it throughput fell back by a fifth.
        libc::mallopt(libc::M_TOP_PAD, 1 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

/// With one worker (`runtime.worker_threads: 1`, tokio's current-thread scheduler) the proxy
/// allocates from glibc's main arena. By default each other thread that allocates (the config
/// watcher's notify thread, a blocking-pool thread) gets an arena of its own, a 64 MiB
/// reservation whose first 1 MiB ([`tune_allocator`]'s `M_TOP_PAD`) its allocations walk
/// through and leave resident: with the config's directory busy (a file written beside it) the
/// notify thread's arena stood at 1 MiB under load, +10 % of the process's RSS
/// (docs/BENCHMARKS.md, "RSS under load, the growth measured"). So with one worker every
/// thread shares the main arena (`M_ARENA_MAX=1`). That includes threads that allocate much:
/// the bridge's runtime thread (`outrigger-bridge`, which builds 4 MiB JSON answers in
/// bench/isolation.sh), the access-log writer (`access-log`), the log agent's spool
/// (`logs-spool`). Measured for the bridge, the heaviest (docs/BENCHMARKS.md, "One malloc
/// arena and the bridge"): the proxy's p99 under bridge load and the bridge's own rate were no
/// worse with one arena than with glibc's (4 arenas there), so no exception is made for them.
/// With several workers their own arenas keep the workers from contending, so it is left to
/// glibc. `OUTRIGGER_MALLOC_ARENA_MAX=N` (read once, here) sets the limit whatever the config
/// says, `=default` leaves glibc's own (for such A/B comparisons). Called before any thread
/// other than main exists: glibc reads the limit when a thread first needs an arena of its own.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn one_malloc_arena(config: &outrigger::config::Config) {
    let by_config = (config.runtime.worker_threads == 1).then_some(1);
    let limit = match std::env::var("OUTRIGGER_MALLOC_ARENA_MAX").ok().as_deref() {
        None => by_config,
        Some("default") => None,
        Some(n) => match n.parse::<i32>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                eprintln!(
                    "warning: OUTRIGGER_MALLOC_ARENA_MAX={n:?} ignored (expected a number from 1, or default)"
                );
                by_config
            }
        },
    };
    if let Some(limit) = limit {
        // SAFETY: mallopt only changes an allocator tunable; no other thread exists yet.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, limit);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn one_malloc_arena(_config: &outrigger::config::Config) {}

/// Hands the pages a load burst left free back to the kernel once the load has ended: the
/// high trim threshold above keeps glibc from doing it per request, and without this an h2c
/// load of 32 connections left the process at ~31 MiB (free pages scattered through the heap,
/// which the top-of-heap trim never reaches) instead of ~15 MiB. `malloc_trim(0)` also returns
/// free pages in the middle of the heap and in every arena, but it holds each arena's lock
/// while it walks the free chunks, and the pages it returns are faulted back in at once while
/// a load goes on: so it runs only when the resident set has grown by [`TRIM_GROWTH`] since
/// the last trim, the process has been quiet (under [`QUIET_CPU`] of CPU time per second)
/// for the last two samples and the resident set has stopped rising, and at most once per
/// [`TRIM_INTERVAL`]. Under a steady load it never runs. Measured against jemalloc and tuned
/// glibc, and p99 with it on and off, in docs/BENCHMARKS.md ("Memory after load").
/// `OUTRIGGER_MALLOC_TRIM=off` leaves it out (for such comparisons). A thread of its own, off
/// the data path; it reads `/proc/self/statm` into a stack buffer and the CPU time with
/// `getrusage`, so it allocates nothing between trims. With each trim it also unmaps the code
/// pages the load mapped (`memory::after_trim`, unless `runtime.code_pages` is `keep`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn start_trimmer() {
    use std::os::unix::fs::FileExt;
    use std::time::{Duration, Instant};
    if std::env::var_os("OUTRIGGER_MALLOC_TRIM").is_some_and(|v| v == "off") {
        return;
    }
    let Ok(statm) = std::fs::File::open("/proc/self/statm") else {
        return;
    };
    // SAFETY: sysconf only reads a constant of the system.
    #[allow(unsafe_code)]
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let resident = move || {
        let mut buf = [0u8; 128];
        let n = statm.read_at(&mut buf, 0).ok()?;
        let text = std::str::from_utf8(&buf[..n]).ok()?;
        let pages: u64 = text.split_ascii_whitespace().nth(1)?.parse().ok()?;
        Some(pages * page)
    };
    let cpu = || {
        // SAFETY: getrusage writes into the zeroed struct it is given.
        #[allow(unsafe_code)]
        unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            if libc::getrusage(libc::RUSAGE_SELF, &mut u) != 0 {
                return None;
            }
            let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
            Some(Duration::from_micros(us(u.ru_utime) + us(u.ru_stime)))
        }
    };
    use outrigger::memory;
    let _ = std::thread::Builder::new()
        .name("outrigger-trim".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let mut floor = resident().unwrap_or(0);
            let mut last = (resident().unwrap_or(0), cpu().unwrap_or_default());
            let mut quiet = 0u32;
            let mut trimmed = Instant::now();
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let (Some(now), Some(used)) = (resident(), cpu()) else {
                    return;
                };
                let step = Trim {
                    resident: now,
                    previous: last.0,
                    cpu: used.saturating_sub(last.1),
                };
                last = (now, used);
                quiet = if step.cpu < QUIET_CPU { quiet + 1 } else { 0 };
                if step.due(floor, quiet, trimmed.elapsed()) {
                    // SAFETY: malloc_trim only returns free memory to the kernel.
                    #[allow(unsafe_code)]
                    unsafe {
                        libc::malloc_trim(0);
                    }
                    // And the code pages the load mapped (a page-cache folio or 64 KiB around
                    // each page it ran): unmapped only, no page-cache drop, so the next load
                    // maps back what it runs from the page cache, without disk reads. The
                    // ranges are found again now (/proc/self/smaps): this allocates, once per
                    // trim, after the trim.
                    if let Some(r) = memory::after_trim() {
                        tracing::debug!(
                            ranges = r.ranges,
                            bytes = r.bytes,
                            error = ?r.error,
                            "code pages unmapped after a load"
                        );
                    }
                    trimmed = Instant::now();
                    floor = resident().unwrap_or(now);
                    last.0 = floor;
                } else {
                    floor = floor.min(now);
                }
            }
        });
}

/// One second's sample of the trimmer.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
struct Trim {
    resident: u64,
    previous: u64,
    /// CPU time the process used since the previous sample.
    cpu: std::time::Duration,
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
impl Trim {
    /// Whether to trim now: grown since the last trim, quiet for two samples (this one
    /// included), not rising, and the last trim long enough ago.
    fn due(&self, floor: u64, quiet: u32, since: std::time::Duration) -> bool {
        self.resident > floor + TRIM_GROWTH
            && quiet >= 2
            && self.resident <= self.previous
            && since >= TRIM_INTERVAL
    }
}

/// Growth of the resident set since the last trim that is worth a trim (small enough to
/// matter for a sidecar).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_GROWTH: u64 = 2 << 20;

/// CPU time per second under which the process counts as quiet (a load has ended): 2%.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const QUIET_CPU: std::time::Duration = std::time::Duration::from_millis(20);

/// The least time between two trims.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod trim_tests {
    use super::*;
    use std::time::Duration;

    const MIB: u64 = 1 << 20;

    fn at(resident: u64, previous: u64, cpu_ms: u64) -> Trim {
        Trim {
            resident: resident * MIB,
            previous: previous * MIB,
            cpu: Duration::from_millis(cpu_ms),
        }
    }

    #[test]
    fn a_steady_load_is_never_trimmed_an_ended_one_is() {
        let long = Duration::from_secs(60);
        // Under load (busy CPU), flat or rising: never, however far above the floor.
        assert!(!at(25, 25, 900).due(16 * MIB, 0, long));
        assert!(!at(26, 25, 900).due(16 * MIB, 0, long));
        // The load ended one second ago: not yet (two quiet samples needed).
        assert!(!at(25, 25, 5).due(16 * MIB, 1, long));
        // Quiet for two samples and not rising: trimmed.
        assert!(at(25, 25, 5).due(16 * MIB, 2, long));
        // Still rising though quiet: not yet.
        assert!(!at(26, 25, 5).due(16 * MIB, 2, long));
        // Grown by less than TRIM_GROWTH: nothing worth it.
        assert!(!at(17, 17, 5).due(16 * MIB, 5, long));
        // Too soon after the last trim.
        assert!(!at(25, 25, 5).due(16 * MIB, 5, Duration::from_secs(3)));
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn start_trimmer() {}
