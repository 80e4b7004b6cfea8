//! Which addresses a webhook may reach, and the resolver that enforces it.
//!
//! A webhook URL is written by whoever writes the config, but the name in it
//! is answered by DNS, which someone else may control. A root daemon that
//! POSTs wherever a name points is a way into the cloud metadata service
//! (169.254.169.254 hands out the host's cloud credentials) and the private
//! network. So the check is made on the *addresses*, after resolving, and
//! the connection goes to exactly the addresses checked: [`GuardedResolver`]
//! is reqwest's resolver, and it returns only addresses that passed. reqwest
//! connects to what its resolver returns and never looks the name up again,
//! so an answer that changes between "check" and "connect" (DNS rebinding)
//! has nowhere to go. An IP literal in the URL never reaches a resolver, so
//! the sink checks it with [`check`] before sending.
//!
//! Allowed: public addresses and loopback (a receiver on the same host is the
//! common case, and reaching it needs no network position an attacker could
//! use). Refused: link-local (where the metadata services live), the known
//! metadata addresses (some are not link-local), unspecified, multicast, broadcast and reserved, and,
//! unless `allow_private`, the private ranges. An IPv6 address that carries
//! an IPv4 one (mapped `::ffff:a.b.c.d`, compatible `::a.b.c.d`, NAT64
//! `64:ff9b::/96`, 6to4 `2002::/16`) is judged as that IPv4 address: the
//! kernel or a NAT64 gateway would deliver it there.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use async_trait::async_trait;

/// Why an address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Metadata,
    LinkLocal,
    Unspecified,
    Multicast,
    Broadcast,
    Reserved,
    Private,
    /// `include_value` over plain http: only loopback may see the value.
    NotLoopback,
}

impl Refusal {
    pub fn why(self) -> &'static str {
        match self {
            Refusal::Metadata => "a cloud metadata service address",
            Refusal::LinkLocal => "link-local",
            Refusal::Unspecified => "unspecified",
            Refusal::Multicast => "multicast",
            Refusal::Broadcast => "broadcast",
            Refusal::Reserved => "reserved",
            Refusal::Private => "private (set `allow_private = true` to allow it)",
            Refusal::NotLoopback => {
                "not loopback, and `include_value` over plain http is only for loopback (use https)"
            }
        }
    }
}

/// What a sink may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Policy {
    pub allow_private: bool,
    /// Only loopback (the value travels over plain http).
    pub loopback_only: bool,
}

/// Metadata and platform services that are not link-local, refused even
/// with `allow_private`: AWS's IPv6 one (in fc00::/7), Alibaba Cloud's (in
/// 100.64/10), Azure's WireServer (a public address that hands a VM its
/// extension settings) and Oracle Cloud's older one (in 192.0.0.0/24).
const METADATA_V4: [Ipv4Addr; 4] = [
    Ipv4Addr::new(169, 254, 169, 254),
    Ipv4Addr::new(100, 100, 100, 200),
    Ipv4Addr::new(168, 63, 129, 16),
    Ipv4Addr::new(192, 0, 0, 192),
];
const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// The IPv4 address an IPv6 one stands for, if it carries one.
fn embedded_v4(a: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = a.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if let Some(v4) = a.to_ipv4_mapped() {
        return Some(v4);
    }
    // IPv4-compatible `::a.b.c.d` (deprecated, still routed by some
    // stacks); `::` and `::1` are themselves, not 0.0.0.0 and 0.0.0.1.
    if s[..6] == [0; 6] && !a.is_unspecified() && !a.is_loopback() {
        return Some(low);
    }
    // NAT64, the well-known prefix 64:ff9b::/96.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(low);
    }
    // 6to4: 2002:AABB:CCDD::/48 is the IPv4 address AA.BB.CC.DD.
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

/// The address of `host` when it is an IP literal (`[v6]` or v4).
pub fn ip_literal(host: &str) -> Option<IpAddr> {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .parse()
        .ok()
}

/// Refuses `url` when its host is an address literal `policy` does not
/// allow: a literal never reaches the resolver that checks names. `shown`
/// names the receiver in the error.
pub fn check_literal(
    url: &reqwest::Url,
    policy: Policy,
    shown: &str,
) -> Result<(), crate::model::PluginError> {
    if let Some(ip) = url.host_str().and_then(ip_literal)
        && let Err(r) = check(ip, policy)
    {
        return Err(crate::model::PluginError::new(
            crate::model::ErrorKind::Invalid,
            format!("{shown}: refusing to connect to {ip}: it is {}", r.why()),
        ));
    }
    Ok(())
}

/// Whether `ip` may be reached under `policy`.
pub fn check(ip: IpAddr, policy: Policy) -> Result<(), Refusal> {
    let ip = match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let (loopback, private) = match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            if METADATA_V4.contains(&a) {
                return Err(Refusal::Metadata);
            }
            if a.is_link_local() {
                return Err(Refusal::LinkLocal);
            }
            if o[0] == 0 {
                // 0.0.0.0/8, "this network": Linux connects 0.0.0.0 to loopback.
                return Err(Refusal::Unspecified);
            }
            if a.is_broadcast() {
                return Err(Refusal::Broadcast);
            }
            if a.is_multicast() {
                return Err(Refusal::Multicast);
            }
            if o[0] >= 240 {
                return Err(Refusal::Reserved);
            }
            let cgnat = o[0] == 100 && (o[1] & 0xc0) == 64;
            (a.is_loopback(), a.is_private() || cgnat)
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            if a == METADATA_V6 {
                return Err(Refusal::Metadata);
            }
            if a.is_unspecified() {
                return Err(Refusal::Unspecified);
            }
            if a.is_multicast() {
                return Err(Refusal::Multicast);
            }
            if (s[0] & 0xffc0) == 0xfe80 {
                return Err(Refusal::LinkLocal);
            }
            // Unique local fc00::/7, and the deprecated site-local fec0::/10.
            let private = (s[0] & 0xfe00) == 0xfc00 || (s[0] & 0xffc0) == 0xfec0;
            (a.is_loopback(), private)
        }
    };
    if policy.loopback_only && !loopback {
        return Err(Refusal::NotLoopback);
    }
    if private && !policy.allow_private {
        return Err(Refusal::Private);
    }
    Ok(())
}

/// Looks a host name up. The system's resolver in the daemon; tests inject
/// answers (a name that points at the metadata service, one that changes).
#[async_trait]
pub trait Lookup: Send + Sync {
    async fn lookup(&self, host: &str) -> std::io::Result<Vec<IpAddr>>;
}

/// The system resolver (`getaddrinfo`, through tokio).
pub struct SystemLookup;

#[async_trait]
impl Lookup for SystemLookup {
    async fn lookup(&self, host: &str) -> std::io::Result<Vec<IpAddr>> {
        Ok(tokio::net::lookup_host((host, 0))
            .await?
            .map(|a| a.ip())
            .collect())
    }
}

/// A name whose every address was refused: the error the resolver hands
/// reqwest, found again in the error's source chain by the sink.
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves only to refused addresses: {}", .refused.iter().map(|(ip, r)| format!("{ip} ({})", r.why())).collect::<Vec<_>>().join(", "))]
pub struct Refused {
    pub host: String,
    pub refused: Vec<(IpAddr, Refusal)>,
}

/// reqwest's resolver for a webhook: looks the name up once and returns
/// only the addresses [`check`] allows, which are then the only ones
/// reqwest connects to.
pub struct GuardedResolver {
    pub lookup: Arc<dyn Lookup>,
    pub policy: Policy,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let lookup = self.lookup.clone();
        let policy = self.policy;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let answers = lookup.lookup(&host).await?;
            let mut allowed = Vec::with_capacity(answers.len());
            let mut refused = Vec::new();
            for ip in answers {
                match check(ip, policy) {
                    Ok(()) => allowed.push(SocketAddr::new(ip, 0)),
                    Err(r) => refused.push((ip, r)),
                }
            }
            if allowed.is_empty() {
                if refused.is_empty() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("{host} has no address"),
                    )
                    .into());
                }
                return Err(Box::new(Refused { host, refused }) as _);
            }
            if !refused.is_empty() {
                tracing::warn!(host = %host, refused = %Refused { host: host.clone(), refused }, "webhook: some addresses of the receiver's name were refused; using the others");
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}
