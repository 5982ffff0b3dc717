//! `charter healthcheck`: probe a running service's /readyz (the container's health
//! check); exit 0 when ready.

use std::io::Write;
use std::process::ExitCode;

/// Where a probe on the same host reaches a server bound to `bind`: a server listening on
/// every address (0.0.0.0 or ::, as in a container) answers on loopback.
pub fn probe_addr(bind: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let ip = match bind.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    std::net::SocketAddr::new(ip, bind.port())
}

pub fn healthcheck(addr: std::net::SocketAddr) -> ExitCode {
    use std::io::Read;
    let attempt = || -> std::io::Result<bool> {
        let timeout = std::time::Duration::from_secs(3);
        let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(format!("GET /readyz HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"))
    };
    match attempt() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("charter at {addr} is not ready");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("charter at {addr} is unreachable: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::probe_addr;

    #[test]
    fn probes_loopback_when_bound_to_every_address() {
        let probe = |bind: &str| probe_addr(bind.parse().unwrap()).to_string();
        assert_eq!(probe("0.0.0.0:9090"), "127.0.0.1:9090");
        assert_eq!(probe("[::]:9090"), "[::1]:9090");
        assert_eq!(probe("10.1.2.3:8080"), "10.1.2.3:8080");
    }
}
