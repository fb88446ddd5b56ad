//! PostgreSQL for fault tests: a private cluster the test may stop and start
//! (so the machine's own at 5432 is never touched).
//!
//! The cluster lives in a temp directory named after the test process; a
//! guard stops and deletes it on drop, panics included, and a later run
//! sweeps up clusters whose test process was killed before its guard ran.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::{free_port, tail};

const DIR_PREFIX: &str = "as-faults-pg-";

pub(crate) struct PrivatePostgres {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

impl PrivatePostgres {
    /// initdb (as the `postgres` OS user when we are root: initdb refuses
    /// root) with trust authentication, then start on a free port.
    pub(crate) fn start() -> Self {
        sweep_stale_clusters();
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cluster directory");
        if running_as_root() {
            run(Command::new("chown").arg("postgres:postgres").arg(&dir));
        }
        let pg = Self {
            port,
            dir,
            bin: bin_dir(),
        };
        pg.as_owner("initdb", |c| {
            c.arg("-D").arg(pg.data()).args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ])
        });
        // Options in the configuration file, so a plain `pg_ctl start` or
        // `restart` brings the cluster back exactly as it was.
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             max_connections = 60\nlog_min_messages = warning\n",
            pg.dir.display()
        );
        let path = pg.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).expect("postgresql.conf");
        text.push_str(&conf);
        std::fs::write(&path, text).expect("write postgresql.conf");
        pg.start_again();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    pub(crate) fn admin_url(&self) -> String {
        self.url("postgres")
    }

    pub(crate) fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Start and wait until it accepts connections.
    pub(crate) fn start_again(&self) {
        let log = self.log();
        self.as_owner("pg_ctl", |c| {
            c.arg("start")
                .arg("-D")
                .arg(self.data())
                .args(["-w", "-t", "60", "-l"])
                .arg(&log)
        });
    }

    /// Stop with a `pg_ctl` shutdown mode (`fast`: clients are disconnected
    /// and a checkpoint written; `immediate`: a crash, recovered from WAL at
    /// the next start) and wait until it is down.
    pub(crate) fn stop(&self, mode: &str) {
        self.as_owner("pg_ctl", |c| {
            c.arg("stop")
                .arg("-D")
                .arg(self.data())
                .args(["-w", "-t", "60", "-m", mode])
        });
    }

    fn as_owner(&self, tool: &str, args: impl FnOnce(&mut Command) -> &mut Command) {
        let exe = self.bin.join(tool);
        let mut cmd = if running_as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        args(&mut cmd);
        run(&mut cmd);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of the private PostgreSQL log ---\n{}",
                tail(&self.log(), 30)
            );
        }
        stop_and_remove(&self.bin, &self.dir);
    }
}

fn stop_and_remove(bin: &Path, dir: &Path) {
    let mut cmd = if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join("pg_ctl"));
        c
    } else {
        Command::new(bin.join("pg_ctl"))
    };
    let _ = cmd
        .arg("stop")
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-w", "-m", "immediate"])
        .output();
    let _ = std::fs::remove_dir_all(dir);
}

/// Clusters left behind by a test process that no longer exists (one killed
/// by the test runner's timeout, whose guards never ran).
fn sweep_stale_clusters() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            stop_and_remove(&bin_dir(), &entry.path());
        }
    }
}

/// `PG_BIN_DIR`, else the newest `/usr/lib/postgresql/*/bin` (Debian), else
/// whatever `PATH` finds.
fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PG_BIN_DIR") {
        return d.into();
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).unwrap_or_default()
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
