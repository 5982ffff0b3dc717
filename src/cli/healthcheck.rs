//! `charter healthcheck`: probe a running service's /readyz (the container's health
//! check); exit 0 when ready (or saturated: loaded and busy).

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

/// Ready, or loaded but saturated: a busy container is not a sick one (its /readyz 503
/// only steers new work elsewhere).
fn healthy(response: &str) -> bool {
    let status = response.split_whitespace().nth(1);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let saturated =
        serde_json::from_str::<serde_json::Value>(body).is_ok_and(|v| v["status"] == "saturated");
    status == Some("200") || (status == Some("503") && saturated)
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
        Ok(healthy(&response))
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
    use super::{healthy, probe_addr};

    #[test]
    fn a_saturated_service_is_healthy_a_loading_one_is_not() {
        let answer = |status: &str, body: &str| format!("HTTP/1.1 {status}\r\nx: y\r\n\r\n{body}");
        assert!(healthy(&answer("200 OK", r#"{"status":"ready"}"#)));
        assert!(healthy(&answer(
            "503 Service Unavailable",
            r#"{"status":"saturated"}"#
        )));
        assert!(!healthy(&answer(
            "503 Service Unavailable",
            r#"{"status":"not_ready"}"#
        )));
        assert!(!healthy(&answer("500 Internal Server Error", "")));
    }

    #[test]
    fn probes_loopback_when_bound_to_every_address() {
        let probe = |bind: &str| probe_addr(bind.parse().unwrap()).to_string();
        assert_eq!(probe("0.0.0.0:9090"), "127.0.0.1:9090");
        assert_eq!(probe("[::]:9090"), "[::1]:9090");
        assert_eq!(probe("10.1.2.3:8080"), "10.1.2.3:8080");
    }
}
