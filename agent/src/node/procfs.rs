//! Parsers for the few procfs files the node layer reads. Each returns None on a shape it
//! does not recognise; the caller names the file in the error.

/// Aggregate CPU jiffies from the first line of /proc/stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    pub busy: u64,
    pub idle: u64,
}

impl CpuTimes {
    /// Busy fraction between `prev` and `self`; 0 when no time passed or counters reset.
    pub fn usage_since(&self, prev: &CpuTimes) -> f64 {
        let busy = self.busy.checked_sub(prev.busy);
        let idle = self.idle.checked_sub(prev.idle);
        match (busy, idle) {
            (Some(b), Some(i)) if b + i > 0 => b as f64 / (b + i) as f64,
            _ => 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDev {
    pub name: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// Aggregate CPU times and the number of `cpuN` lines.
pub fn parse_stat(s: &str) -> Option<(CpuTimes, u32)> {
    let mut lines = s.lines();
    let first = lines.next()?;
    let mut f = first.split_whitespace();
    if f.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = f.map(|x| x.parse().ok()).collect::<Option<_>>()?;
    if v.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    let idle = at(3) + at(4);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    let cpus = s.lines().filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit)).count() as u32;
    Some((CpuTimes { busy, idle }, cpus.max(1)))
}

/// (MemTotal, MemAvailable) in bytes.
pub fn parse_meminfo(s: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

pub fn parse_loadavg(s: &str) -> Option<[f64; 3]> {
    let mut f = s.split_whitespace().map(|x| x.parse::<f64>().ok());
    Some([f.next()??, f.next()??, f.next()??])
}

pub fn parse_net_dev(s: &str) -> Option<Vec<NetDev>> {
    let mut out = Vec::new();
    for line in s.lines().skip(2) {
        let (name, rest) = line.split_once(':')?;
        let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().ok()).collect::<Option<_>>()?;
        if f.len() < 16 {
            return None;
        }
        out.push(NetDev { name: name.trim().to_owned(), rx_bytes: f[0], tx_bytes: f[8] });
    }
    Some(out)
}

pub fn os_release_pretty_name(s: &str) -> Option<String> {
    s.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=")).map(|v| v.trim_matches('"').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_shapes_it_does_not_know() {
        assert_eq!(parse_stat("intr 1 2\n"), None);
        assert_eq!(parse_stat("cpu 1 2\n"), None);
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_loadavg("0.1 x 0.3"), None);
        assert_eq!(parse_net_dev("h\nh\n eth0: 1 2 3\n"), None);
    }

    #[test]
    fn usage_handles_counter_reset() {
        let a = CpuTimes { busy: 100, idle: 100 };
        let b = CpuTimes { busy: 50, idle: 200 };
        assert_eq!(b.usage_since(&a), 0.0);
        assert_eq!(a.usage_since(&a), 0.0);
    }

    #[test]
    fn os_release() {
        assert_eq!(os_release_pretty_name("ID=debian\nPRETTY_NAME=\"Debian GNU/Linux 12\"\n").as_deref(), Some("Debian GNU/Linux 12"));
    }
}
