//! The `somna.*` words of the kernel command line (see "The guest contract").

/// How the host reaches the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    /// The virtio-serial port named `somna.agent`.
    Serial,
    /// AF_VSOCK, port `GUEST_VSOCK_PORT`, any CID.
    Vsock,
}

/// Settings the host passes to the guest on the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    pub id: String,
    pub hostname: String,
    pub channel: ChannelKind,
    pub probe: bool,
    /// A tracing filter, e.g. `debug` (default `info`).
    pub log: String,
    /// eth0's configuration (`somna.ip=A.B.C.D/N somna.gw=A.B.C.D
    /// somna.mtu=N`), when the VM has a network device.
    pub net: Option<NetConfig>,
}

/// eth0 as the host's network slot expects it (the same on every slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    pub ip: std::net::Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: std::net::Ipv4Addr,
    pub mtu: u16,
}

/// Errors that make the command line unusable (the agent powers off on them,
/// so they say what the host has to change).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("unknown somna.channel={0:?}; use \"serial\" or \"vsock\"")]
    UnknownChannel(String),
    #[error("bad {0}={1:?}: expected {2}")]
    BadNet(&'static str, String, &'static str),
}

impl Cmdline {
    /// Parses the contents of `/proc/cmdline`. Unknown words are ignored; the
    /// last of repeated words wins, like the kernel's own parameters.
    pub fn parse(text: &str) -> Result<Cmdline, CmdlineError> {
        let mut id = String::new();
        let mut hostname = None;
        let mut channel = ChannelKind::Serial;
        let mut probe = false;
        let mut log = "info".to_string();
        let (mut ip, mut gateway, mut mtu) = (None, None, 1500u16);
        let bad = |k: &'static str, v: &str, what: &'static str| {
            CmdlineError::BadNet(k, v.to_string(), what)
        };
        for word in split_words(text) {
            let (key, value) = match word.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (word.as_str(), None),
            };
            match (key, value) {
                ("somna.id", Some(v)) => id = v.to_string(),
                ("somna.hostname", Some(v)) if !v.is_empty() => hostname = Some(v.to_string()),
                ("somna.channel", Some(v)) => {
                    channel = match v {
                        "serial" | "" => ChannelKind::Serial,
                        "vsock" => ChannelKind::Vsock,
                        other => return Err(CmdlineError::UnknownChannel(other.to_string())),
                    }
                }
                ("somna.probe", v) => {
                    probe = matches!(v, None | Some("1") | Some("true") | Some("yes"))
                }
                ("somna.log", Some(v)) if !v.is_empty() => log = v.to_string(),
                ("somna.ip", Some(v)) => {
                    let parsed = v.split_once('/').and_then(|(a, n)| {
                        Some((a.parse().ok()?, n.parse::<u8>().ok().filter(|n| *n <= 32)?))
                    });
                    ip = Some(parsed.ok_or_else(|| bad("somna.ip", v, "A.B.C.D/N"))?);
                }
                ("somna.gw", Some(v)) => {
                    gateway = Some(v.parse().map_err(|_| bad("somna.gw", v, "A.B.C.D"))?)
                }
                ("somna.mtu", Some(v)) => {
                    mtu = v.parse().map_err(|_| bad("somna.mtu", v, "a number"))?
                }
                _ => {}
            }
        }
        let hostname = hostname.unwrap_or_else(|| id.clone());
        let net = match (ip, gateway) {
            (Some((ip, prefix_len)), Some(gateway)) => Some(NetConfig {
                ip,
                prefix_len,
                gateway,
                mtu,
            }),
            (None, None) => None,
            _ => return Err(bad("somna.ip", "", "somna.ip and somna.gw together")),
        };
        Ok(Cmdline {
            id,
            hostname,
            channel,
            probe,
            log,
            net,
        })
    }
}

/// Splits on whitespace, honouring double quotes the way the kernel does
/// (`key="a b"` is one word, quotes removed).
fn split_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut has_word = false;
    for c in text.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                has_word = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if has_word {
                    words.push(std::mem::take(&mut cur));
                    has_word = false;
                }
            }
            c => {
                cur.push(c);
                has_word = true;
            }
        }
    }
    if has_word {
        words.push(cur);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Cmdline::parse("console=ttyS0 quiet panic=-1\n").unwrap();
        assert_eq!(
            c,
            Cmdline {
                id: String::new(),
                hostname: String::new(),
                channel: ChannelKind::Serial,
                probe: false,
                log: "info".into(),
                net: None,
            }
        );
    }

    #[test]
    fn network_words() {
        let c =
            Cmdline::parse("somna.id=a somna.ip=172.16.0.2/30 somna.gw=172.16.0.1 somna.mtu=1400")
                .unwrap();
        assert_eq!(
            c.net,
            Some(NetConfig {
                ip: "172.16.0.2".parse().unwrap(),
                prefix_len: 30,
                gateway: "172.16.0.1".parse().unwrap(),
                mtu: 1400,
            })
        );
        assert!(matches!(
            Cmdline::parse("somna.ip=172.16.0.2/33 somna.gw=172.16.0.1"),
            Err(CmdlineError::BadNet("somna.ip", ..))
        ));
        assert!(Cmdline::parse("somna.ip=172.16.0.2/30").is_err());
    }

    #[test]
    fn all_words() {
        let c = Cmdline::parse(
            "console=ttyS0 somna.id=sb-1 somna.hostname=box somna.channel=vsock somna.log=debug quiet\n",
        )
        .unwrap();
        assert_eq!(c.id, "sb-1");
        assert_eq!(c.hostname, "box");
        assert_eq!(c.channel, ChannelKind::Vsock);
        assert_eq!(c.log, "debug");
        assert!(!c.probe);
    }

    #[test]
    fn hostname_defaults_to_id() {
        let c = Cmdline::parse("somna.id=abc somna.channel=serial").unwrap();
        assert_eq!(c.hostname, "abc");
        assert_eq!(c.channel, ChannelKind::Serial);
    }

    #[test]
    fn probe() {
        assert!(Cmdline::parse("somna.probe=1").unwrap().probe);
        assert!(Cmdline::parse("somna.probe").unwrap().probe);
        assert!(!Cmdline::parse("somna.probe=0").unwrap().probe);
    }

    #[test]
    fn quotes_and_last_wins() {
        let c = Cmdline::parse("somna.id=a somna.hostname=\"my host\" somna.id=b").unwrap();
        assert_eq!(c.id, "b");
        assert_eq!(c.hostname, "my host");
    }

    #[test]
    fn bad_channel() {
        assert_eq!(
            Cmdline::parse("somna.channel=pigeon"),
            Err(CmdlineError::UnknownChannel("pigeon".into()))
        );
    }
}
