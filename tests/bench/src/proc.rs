//! What the benchmark reads from `/proc`: CPU time and resident memory of a
//! process (the server under test, or the load generator itself), CPU time
//! of a process tree (a PostgreSQL cluster), and the open-files limit that
//! 10,000 connections need.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, bail};

/// A process to measure: `None` is the load generator itself.
#[derive(Debug, Clone, Copy)]
pub struct Pid(pub Option<u32>);

impl Pid {
    /// The load generator.
    pub const SELF: Pid = Pid(None);

    fn path(self, file: &str) -> String {
        match self.0 {
            Some(pid) => format!("/proc/{pid}/{file}"),
            None => format!("/proc/self/{file}"),
        }
    }

    /// User plus system CPU time used so far (all threads).
    pub fn cpu(self) -> anyhow::Result<Duration> {
        let stat = Stat::read(&self.path("stat"))?;
        Ok(ticks(stat.utime + stat.stime))
    }

    /// CPU time used so far by the process and every child it has or had:
    /// a PostgreSQL postmaster and its backends, which come and go with
    /// connections. A child counts while it runs (its own user and system
    /// time) and, once it has exited and been reaped, in the parent's
    /// children's time; so the difference of two readings is the tree's
    /// CPU in between, whichever children ended meanwhile.
    pub fn tree_cpu(self) -> anyhow::Result<Duration> {
        let path = self.path("stat");
        let parent = Stat::read(&path)?;
        let pid = self.0.unwrap_or_else(std::process::id);
        let mut total = parent.utime + parent.stime + parent.cutime + parent.cstime;
        for entry in std::fs::read_dir("/proc").context("reading /proc")? {
            let name = entry?.file_name();
            let Some(child) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            // A process may end between the listing and the read.
            if let Ok(stat) = Stat::read(&format!("/proc/{child}/stat"))
                && stat.ppid == pid
            {
                total += stat.utime + stat.stime;
            }
        }
        Ok(ticks(total))
    }

    /// Resident set size (VmRSS), in KiB.
    pub fn rss_kib(self) -> anyhow::Result<u64> {
        let path = self.path("status");
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("{path}: no VmRSS"))
    }
}

/// The fields of `/proc/<pid>/stat` the benchmark reads, in clock ticks.
struct Stat {
    ppid: u32,
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

impl Stat {
    fn read(path: &str) -> anyhow::Result<Stat> {
        let stat = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        // The command name (field 2) may contain spaces: count from its ')'.
        let rest = stat
            .rfind(')')
            .map(|i| &stat[i + 1..])
            .with_context(|| format!("{path}: no ')'"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After ')': state is field 3, so field n is at n - 3: ppid (4),
        // utime (14), stime (15), cutime (16), cstime (17).
        let field = |n: usize| -> anyhow::Result<u64> {
            fields
                .get(n - 3)
                .with_context(|| format!("{path}: too few fields"))?
                .parse::<u64>()
                .with_context(|| format!("{path}: field {n}"))
        };
        Ok(Stat {
            ppid: u32::try_from(field(4)?).unwrap_or(0),
            utime: field(14)?,
            stime: field(15)?,
            cutime: field(16)?,
            cstime: field(17)?,
        })
    }
}

/// Clock ticks as a duration.
fn ticks(n: u64) -> Duration {
    Duration::from_nanos(n * 1_000_000_000 / clock_ticks())
}

/// Kernel clock ticks per second (`getconf CLK_TCK`; 100 on Linux if that fails).
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// Fails early, with the fix, when this process may not open `needed` files
/// (sockets count; a child server inherits the same limit).
pub fn check_open_files(needed: u64) -> anyhow::Result<()> {
    let limits =
        std::fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits")?;
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<u64>().ok());
    match soft {
        Some(soft) if soft < needed => bail!(
            "the open-files limit is {soft}, this run needs about {needed}: raise it first (`ulimit -n {needed}`; run.sh does)"
        ),
        _ => Ok(()),
    }
}
