//! Real servers the bridge tests need, each started on a free loopback port in its own temp
//! dir and killed when dropped: redis-server (with or without persistence), nats-server with
//! JetStream.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Generous: a healthy server answers within milliseconds.
const START_WAIT: Duration = Duration::from_secs(30);

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A redis-server of our own.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    persistent: bool,
}

/// A server program holding none of the descriptors the test inherited:
/// `flock /tmp/outrigger-cargo.lock cargo test` passes the lock's fd down, and a server left
/// over from an aborted run would hold the lock for everyone.
pub fn server_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(program);
    // SAFETY: close_range is async-signal-safe; CLOEXEC (not closing) leaves std's own
    // exec-error pipe working, and everything from fd 3 up is gone at exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::close_range(
                3,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
            );
            Ok(())
        });
    }
    cmd
}

impl RedisServer {
    /// Without persistence.
    pub fn start() -> Self {
        Self::with(false)
    }

    /// Persisting (AOF, fsync always), so [`Self::restart`] keeps the data.
    pub fn start_persistent() -> Self {
        Self::with(true)
    }

    fn with(persistent: bool) -> Self {
        let mut s = RedisServer {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            persistent,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let aof = if self.persistent { "yes" } else { "no" };
        let child = server_command("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", aof, "--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed for the bridge tests (.ci/run installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + START_WAIT;
        while self.command(&["PING"]).as_deref() != Some("+PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server never answered PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Sends one command (RESP), returns the first reply line.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).ok()?;
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        Some(text.trim_end().to_string())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A nats-server with JetStream, storing in a temp dir (kept across a restart).
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl NatsServer {
    pub fn start() -> Self {
        let mut s = NatsServer {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = server_command("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is installed");
        self.child = Some(child);
        let deadline = Instant::now() + START_WAIT;
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::Read;
                let mut buf = [0u8; 4];
                if s.read_exact(&mut buf).is_ok() && &buf == b"INFO" {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "nats-server did not greet");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A database of our own on the machine's PostgreSQL (127.0.0.1:5432, trust auth), named
/// `outrigger_test_<random>`, dropped when dropped.
pub struct PostgresDb {
    pub name: String,
}

impl PostgresDb {
    pub fn create() -> Self {
        let name = format!("outrigger_test_{:016x}", fastrand_u64());
        let db = PostgresDb { name };
        db.admin(&format!("CREATE DATABASE {}", db.name));
        db
    }

    /// `connectionString` in the Dapr docs' key=value form.
    pub fn connection_string(&self) -> String {
        format!(
            "host=127.0.0.1 user=postgres port=5432 connect_timeout=10 database={}",
            self.name
        )
    }

    /// Drops a role a test made (cluster-wide: after `DROP OWNED BY` in each database).
    pub fn drop_role(role: &str) {
        psql("postgres", &format!("DROP ROLE IF EXISTS {role}"));
    }

    fn admin(&self, sql: &str) -> String {
        psql("postgres", sql)
    }

    /// Runs SQL in this database; returns the unaligned, tuples-only output.
    pub fn sql(&self, sql: &str) -> String {
        psql(&self.name, sql)
    }
}

fn psql(db: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", "5432", "-U", "postgres", "-d", db])
        .args(["-v", "ON_ERROR_STOP=1", "-XAtq", "-c", sql])
        .output()
        .expect("psql must be installed (PostgreSQL runs on 127.0.0.1:5432 for these tests)");
    assert!(
        out.status.success(),
        "psql {sql:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

impl Drop for PostgresDb {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-XAtq",
                "-c",
            ])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .output();
    }
}

/// A vhost of our own on the machine's RabbitMQ (127.0.0.1:5672, guest/guest), named
/// `outrigger_test_<random>`, deleted (with its exchanges and queues) when dropped.
pub struct RabbitVhost {
    pub name: String,
}

impl RabbitVhost {
    pub fn create() -> Self {
        let name = format!("outrigger_test_{:016x}", fastrand_u64());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        RabbitVhost { name }
    }

    /// `connectionString` for this vhost.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.name)
    }

    /// Each queue's `(ready, unacknowledged)` message counts.
    pub fn queues(&self) -> std::collections::BTreeMap<String, (u64, u64)> {
        rabbitmqctl(&[
            "list_queues",
            "-p",
            &self.name,
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?.to_string();
            Some((name, (f.next()?.parse().ok()?, f.next()?.parse().ok()?)))
        })
        .collect()
    }

    /// The broker closes every client connection to this vhost (as a broker restart would).
    pub fn close_connections(&self) {
        rabbitmqctl(&[
            "close_all_connections",
            "-p",
            &self.name,
            "test: connection dropped",
        ]);
    }
}

impl Drop for RabbitVhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.name])
            .output();
    }
}

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("rabbitmqctl must be installed (RabbitMQ runs on 127.0.0.1:5672 for these tests)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A mosquitto of our own on a given loopback port (anonymous, no persistence), killed when
/// dropped.
pub struct MosquittoServer {
    child: Child,
}

impl MosquittoServer {
    pub fn start(port: u16) -> Self {
        let child = Command::new("mosquitto")
            .args(["-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto must be installed (.ci/run installs it)");
        let deadline = Instant::now() + START_WAIT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        MosquittoServer { child }
    }

    /// A Mosquitto on `port` with these extra configuration lines.
    pub fn start_with(port: u16, config: &str) -> Self {
        let file = std::env::temp_dir().join(format!("outrigger-mosquitto-{port}.conf"));
        std::fs::write(
            &file,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\n{config}\n"),
        )
        .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto must be installed (.ci/run installs it)");
        let deadline = Instant::now() + START_WAIT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        MosquittoServer { child }
    }
}

impl Drop for MosquittoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PostgreSQL of our own on TLS only (`ssl=on`, plain connections rejected by pg_hba), in a
/// temp dir on a free port, from `initdb` (~1 s). Role `app` logs in by SCRAM (password
/// `secret`), role `certuser` by its client certificate (CN `certuser`); both may use database
/// `app`. Listens on 127.0.0.1 and 127.0.0.2 (an address its certificate does not carry). Runs
/// as the `postgres` user when the tests run as root (the server refuses root).
pub struct PostgresTlsServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    /// uid and gid to run as (None: ourselves).
    user: Option<(u32, u32)>,
}

impl PostgresTlsServer {
    /// `certs` holds `ca.crt` and `server.crt`/`server.key` (`outrigger certs`).
    pub fn start(certs: &std::path::Path) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries under /usr/lib/postgresql")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|b| b.join("initdb").exists())
            .expect("initdb under /usr/lib/postgresql/*/bin");
        let dir = tempfile::tempdir().unwrap();
        // The key must belong to the server's user, readable by it only.
        for f in ["server.crt", "server.key", "ca.crt"] {
            std::fs::copy(certs.join(f), dir.path().join(f)).unwrap();
        }
        std::fs::set_permissions(
            dir.path().join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let user = nix::unistd::Uid::effective().is_root().then(|| {
            let u = nix::unistd::User::from_name("postgres")
                .unwrap()
                .expect("a postgres user to run the server as");
            for entry in std::fs::read_dir(dir.path()).unwrap() {
                nix::unistd::chown(&entry.unwrap().path(), Some(u.uid), Some(u.gid)).unwrap();
            }
            nix::unistd::chown(dir.path(), Some(u.uid), Some(u.gid)).unwrap();
            (u.uid.as_raw(), u.gid.as_raw())
        });
        let mut s = PostgresTlsServer {
            child: None,
            port: free_port(),
            dir,
            bin,
            user,
        };
        let data = s.dir.path().join("data");
        let mut initdb = s.command("initdb");
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-N", "--auth=trust"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let out = initdb.output().unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all app 127.0.0.0/8 scram-sha-256\n\
             hostssl all certuser 127.0.0.0/8 cert\n\
             hostnossl all all 0.0.0.0/0 reject\n",
        )
        .unwrap();
        s.spawn();
        s.psql(
            "postgres",
            "CREATE ROLE app LOGIN PASSWORD 'secret'; CREATE ROLE certuser LOGIN",
        );
        s.psql("postgres", "CREATE DATABASE app OWNER app");
        s.psql("app", "GRANT ALL ON SCHEMA public TO certuser");
        s
    }

    /// One of the server's programs, run as its user, holding none of the descriptors the
    /// test inherited (see [`server_command`]).
    fn command(&self, program: &str) -> Command {
        use std::os::unix::process::CommandExt;
        let mut cmd = server_command(self.bin.join(program));
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    fn spawn(&mut self) {
        let d = self.dir.path();
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(d.join("data"))
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1,127.0.0.2", "-c", "ssl=on"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", d.display()))
            .arg("-c")
            .arg(format!("ssl_cert_file={}", d.join("server.crt").display()))
            .arg("-c")
            .arg(format!("ssl_key_file={}", d.join("server.key").display()))
            .arg("-c")
            .arg(format!("ssl_ca_file={}", d.join("ca.crt").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(cmd.spawn().unwrap());
        let deadline = Instant::now() + START_WAIT;
        loop {
            let ready = self
                .command("pg_isready")
                .arg("-h")
                .arg(self.dir.path())
                .args(["-p", &self.port.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "the TLS postgres did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The directory of the server's unix socket (`local all all trust`).
    pub fn socket_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// SQL as the superuser over the unix socket; the unaligned, tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = self
            .command("psql")
            .arg("-h")
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db])
            .args(["-v", "ON_ERROR_STOP=1", "-XAtq", "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Stops the server (fast shutdown), keeping its data for [`Self::restart`].
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for PostgresTlsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
