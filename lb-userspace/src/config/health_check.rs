//! A target group's `health_check` settings (the schema and its validation), modelled on
//! an AWS Network Load Balancer's. The probes that use them are in `crate::health`.

use std::{fmt, net::SocketAddr, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};

/// Smallest and largest `interval_secs`.
pub const INTERVAL_SECS_RANGE: (u64, u64) = (1, 300);
/// Smallest and largest `healthy_threshold` / `unhealthy_threshold`.
pub const THRESHOLD_RANGE: (u32, u32) = (2, 10);
/// Smallest and largest HTTP status code accepted in `success_codes`.
pub const SUCCESS_CODE_RANGE: (u16, u16) = (200, 599);
/// Longest HTTP health check `path`, in bytes.
pub const MAX_PATH_LEN: usize = 1024;
/// The most bytes an HTTP probe reads while looking for the status line.
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024;
/// `User-Agent` sent by HTTP probes.
pub const USER_AGENT: &str = "lb-health-check/1";

/// A health check setting that is out of range or malformed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HealthConfigError {
    /// `interval_secs` outside 1..=300.
    #[error(
        "health_check.interval_secs = {value} is out of range: use {}..={}",
        INTERVAL_SECS_RANGE.0,
        INTERVAL_SECS_RANGE.1
    )]
    Interval {
        /// The configured value.
        value: u64,
    },
    /// `timeout_secs` is 0 or more than `interval_secs`.
    #[error("health_check.timeout_secs = {value} is out of range: use 1 up to interval_secs ({interval})")]
    Timeout {
        /// The configured value.
        value: u64,
        /// The configured `interval_secs`.
        interval: u64,
    },
    /// `healthy_threshold` or `unhealthy_threshold` outside 2..=10.
    #[error("health_check.{field} = {value} is out of range: use {}..={}", THRESHOLD_RANGE.0, THRESHOLD_RANGE.1)]
    Threshold {
        /// Which threshold.
        field: &'static str,
        /// The configured value.
        value: u32,
    },
    /// `port = 0`.
    #[error("health_check.port = 0 is out of range: use 1..=65535, or leave it out to probe the traffic port")]
    Port,
    /// `path` is not a valid request path.
    #[error(
        "health_check.path = {value:?} is not valid: {reason}; use 1..={MAX_PATH_LEN} visible ASCII characters starting with `/`"
    )]
    Path {
        /// The configured value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `success_codes` does not parse.
    #[error(
        "health_check.success_codes = {value:?} is not valid: {reason}; use codes in {}..={} written like \"200\", \"200-299\" or \"200,202,300-399\"",
        SUCCESS_CODE_RANGE.0,
        SUCCESS_CODE_RANGE.1
    )]
    SuccessCodes {
        /// The configured value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// How a target is probed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckProtocol {
    /// A TCP connect: healthy if the handshake completes within the timeout.
    #[default]
    Tcp,
    /// An HTTP/1.1 `GET`: healthy if the status code is one of `success_codes`.
    Http,
}

impl fmt::Display for CheckProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckProtocol::Tcp => "tcp",
            CheckProtocol::Http => "http",
        })
    }
}

/// A target group's health check settings. Every field is optional in the config file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    /// Probe protocol, `tcp` or `http`. Default: `tcp`.
    pub protocol: CheckProtocol,
    /// Port to probe. Default: none, meaning the target's traffic port (UDP listeners must set it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// HTTP request path (`http` only). Default: `"/"`.
    pub path: String,
    /// HTTP status codes that count as healthy (`http` only), e.g. `"200"`, `"200-299"` or
    /// `"200,202,300-399"`. Default: `"200-399"`.
    pub success_codes: String,
    /// Seconds between probes of one target, 1..=300. Default: 5.
    pub interval_secs: u64,
    /// Seconds before a probe counts as failed, 1 up to `interval_secs`. Default: 2.
    pub timeout_secs: u64,
    /// Consecutive successes that make a target healthy, 2..=10. Default: 3.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a target unhealthy, 2..=10. Default: 2.
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            protocol: CheckProtocol::Tcp,
            port: None,
            path: "/".to_owned(),
            success_codes: "200-399".to_owned(),
            interval_secs: 5,
            timeout_secs: 2,
            healthy_threshold: 3,
            unhealthy_threshold: 2,
        }
    }
}

impl HealthCheck {
    /// Checks every field (including `path` and `success_codes` when the protocol is `tcp`).
    pub fn validate(&self) -> Result<(), HealthConfigError> {
        let (min, max) = INTERVAL_SECS_RANGE;
        if !(min..=max).contains(&self.interval_secs) {
            return Err(HealthConfigError::Interval { value: self.interval_secs });
        }
        if self.timeout_secs == 0 || self.timeout_secs > self.interval_secs {
            return Err(HealthConfigError::Timeout { value: self.timeout_secs, interval: self.interval_secs });
        }
        for (field, value) in
            [("healthy_threshold", self.healthy_threshold), ("unhealthy_threshold", self.unhealthy_threshold)]
        {
            if !(THRESHOLD_RANGE.0..=THRESHOLD_RANGE.1).contains(&value) {
                return Err(HealthConfigError::Threshold { field, value });
            }
        }
        if self.port == Some(0) {
            return Err(HealthConfigError::Port);
        }
        validate_path(&self.path)?;
        self.parse_success_codes().map(drop)
    }

    /// Time between probes.
    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.interval_secs)
    }

    /// Time allowed for one probe.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    /// `success_codes` parsed into a matcher.
    pub fn parse_success_codes(&self) -> Result<SuccessCodes, HealthConfigError> {
        self.success_codes.parse()
    }

    /// The address to probe for a target whose traffic goes to `target`: `port` overrides its port.
    pub fn probe_addr(&self, target: SocketAddr) -> SocketAddr {
        SocketAddr::new(target.ip(), self.port.unwrap_or(target.port()))
    }
}

pub fn validate_path(path: &str) -> Result<(), HealthConfigError> {
    let reason = if !path.starts_with('/') {
        Some("it must start with `/`")
    } else if path.len() > MAX_PATH_LEN {
        Some("it is too long")
    } else if !path.bytes().all(|b| b.is_ascii_graphic()) {
        Some("it contains a space, a control or a non-ASCII character")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(HealthConfigError::Path { value: path.to_owned(), reason }),
        None => Ok(()),
    }
}

/// A set of HTTP status codes, parsed from `"200"`, `"200-299"` or `"200,202,300-399"`.
/// Displays in canonical form (no spaces).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuccessCodes {
    ranges: Vec<(u16, u16)>,
}

impl SuccessCodes {
    /// Whether `code` is one of the codes.
    pub fn contains(&self, code: u16) -> bool {
        self.ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&code))
    }
}

impl FromStr for SuccessCodes {
    type Err = HealthConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| HealthConfigError::SuccessCodes { value: text.to_owned(), reason };
        let code = |s: &str| -> Result<u16, HealthConfigError> {
            let s = s.trim();
            let code: u16 = s.parse().map_err(|_| err(format!("`{s}` is not a status code")))?;
            if (SUCCESS_CODE_RANGE.0..=SUCCESS_CODE_RANGE.1).contains(&code) {
                Ok(code)
            } else {
                Err(err(format!("{code} is out of range")))
            }
        };
        let ranges = text
            .split(',')
            .map(|item| {
                if item.trim().is_empty() {
                    return Err(err("it has an empty entry".to_owned()));
                }
                let (lo, hi) = match item.split_once('-') {
                    Some((lo, hi)) => (code(lo)?, code(hi)?),
                    None => (code(item)?, code(item)?),
                };
                if lo > hi {
                    return Err(err(format!("range {lo}-{hi} is backwards")));
                }
                Ok((lo, hi))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SuccessCodes { ranges })
    }
}

impl fmt::Display for SuccessCodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(lo, hi)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi { write!(f, "{lo}")? } else { write!(f, "{lo}-{hi}")? }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults() {
        let c = HealthCheck::default();
        assert_eq!(c.protocol, CheckProtocol::Tcp);
        assert_eq!(c.port, None);
        assert_eq!(c.path, "/");
        assert_eq!(c.success_codes, "200-399");
        assert_eq!((c.interval_secs, c.timeout_secs), (5, 2));
        assert_eq!((c.healthy_threshold, c.unhealthy_threshold), (3, 2));
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(toml::from_str::<HealthCheck>("").expect("empty table"), c);
        assert_eq!(c.timeout(), Duration::from_secs(2));
    }

    #[test]
    fn config_parses_and_round_trips() {
        let c: HealthCheck =
            toml::from_str("protocol = \"http\"\nport = 8080\npath = \"/healthz\"\nsuccess_codes = \"200,202\"")
                .expect("valid");
        assert_eq!(c.protocol, CheckProtocol::Http);
        assert_eq!(c.probe_addr("127.0.0.1:80".parse().expect("addr")), "127.0.0.1:8080".parse().expect("addr"));
        let loopback: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        assert_eq!(HealthCheck::default().probe_addr(loopback), loopback);
        let text = toml::to_string(&c).expect("serialize");
        assert_eq!(toml::from_str::<HealthCheck>(&text).expect("round trip"), c);
        let err = toml::from_str::<HealthCheck>("intervall_secs = 5").expect_err("unknown field");
        assert!(err.to_string().contains("intervall_secs"), "{err}");
        assert!(toml::from_str::<HealthCheck>("protocol = \"udp\"").is_err());
    }

    /// An edit that breaks a valid config, the error it causes, and part of its message.
    type Case = (fn(&mut HealthCheck), HealthConfigError, &'static str);

    #[test]
    fn config_validation_errors_name_field_value_and_range() {
        let cases: [Case; 8] = [
            (
                |c| c.interval_secs = 0,
                HealthConfigError::Interval { value: 0 },
                "interval_secs = 0 is out of range: use 1..=300",
            ),
            (|c| c.interval_secs = 301, HealthConfigError::Interval { value: 301 }, "interval_secs = 301"),
            (
                |c| c.timeout_secs = 6,
                HealthConfigError::Timeout { value: 6, interval: 5 },
                "timeout_secs = 6 is out of range",
            ),
            (|c| c.timeout_secs = 0, HealthConfigError::Timeout { value: 0, interval: 5 }, "up to interval_secs (5)"),
            (
                |c| c.healthy_threshold = 1,
                HealthConfigError::Threshold { field: "healthy_threshold", value: 1 },
                "healthy_threshold = 1 is out of range: use 2..=10",
            ),
            (
                |c| c.unhealthy_threshold = 11,
                HealthConfigError::Threshold { field: "unhealthy_threshold", value: 11 },
                "unhealthy_threshold = 11 is out of range: use 2..=10",
            ),
            (|c| c.port = Some(0), HealthConfigError::Port, "port = 0 is out of range: use 1..=65535"),
            (
                |c| c.path = "/a b".to_owned(),
                HealthConfigError::Path {
                    value: "/a b".to_owned(),
                    reason: "it contains a space, a control or a non-ASCII character",
                },
                "path = \"/a b\" is not valid",
            ),
        ];
        for (edit, expected, message) in cases {
            let mut c = HealthCheck::default();
            edit(&mut c);
            let err = c.validate().expect_err("invalid");
            assert_eq!(err, expected);
            assert!(err.to_string().starts_with("health_check."), "{err}");
            assert!(err.to_string().contains(message), "{err}");
        }
        let c = HealthCheck { path: "health".to_owned(), ..HealthCheck::default() };
        assert!(c.validate().expect_err("no slash").to_string().contains("must start with `/`"));
        let c = HealthCheck { success_codes: "200-".to_owned(), ..HealthCheck::default() };
        let err = c.validate().expect_err("bad codes").to_string();
        assert!(err.contains("success_codes = \"200-\"") && err.contains("200..=599"), "{err}");
        let c = HealthCheck { interval_secs: 300, timeout_secs: 299, ..HealthCheck::default() };
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn success_codes_parse() {
        let one: SuccessCodes = "200".parse().expect("single");
        assert!(one.contains(200) && !one.contains(201));
        let range: SuccessCodes = "200-299".parse().expect("range");
        assert!(range.contains(200) && range.contains(299) && !range.contains(300) && !range.contains(199));
        let list: SuccessCodes = " 200 , 202,300-399".parse().expect("list");
        assert!(list.contains(202) && list.contains(350) && !list.contains(201) && !list.contains(400));
        assert_eq!(list.to_string(), "200,202,300-399");
        assert_eq!("404-404".parse::<SuccessCodes>().expect("degenerate").to_string(), "404");
        for bad in ["", "abc", "200,", "200-", "-200", "299-200", "199", "600", "200-600", "2OO", "200-300-400"] {
            let err = bad.parse::<SuccessCodes>().expect_err(bad);
            assert!(matches!(&err, HealthConfigError::SuccessCodes { value, .. } if value == bad), "{bad}: {err}");
        }
    }
}
