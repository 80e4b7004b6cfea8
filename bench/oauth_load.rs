//! Token service benchmark (issue 16): exchanges per second and latency,
//! with EdDSA and ES256 subject tokens, and introspections per second.
//!
//!     cargo build --release && cargo run --release --example oauth_load -- \
//!         --bin target/release/keyturn [--seconds 10] [--connections 32]
//!
//! It starts the given keyturn binary on a config of its own (a temp dir:
//! the local vault, an agent `bot` with an `auth_key`, the signing
//! credential `keyturn/signer`, one subject issuer pinned to EdDSA and
//! ES256 with its key set in a file), waits for the keys to be delivered,
//! then, per subject algorithm:
//!   1. pre-signs every request body (two fresh assertions each: client and
//!      actor, single-use `jti`s; the subject token is the same human's) so
//!      that signing does not compete with the daemon during the window;
//!   2. closed loop: `--connections` keep-alive HTTP/1.1 connections POST
//!      `/oauth/token` as fast as answers come, for `--seconds`; every
//!      answer must be 200;
//!   3. open loop at half that rate: p50/p99 of each request, sent on a
//!      schedule (latency counts from the scheduled time, so a stall shows).
//!
//! Then introspections per second (closed loop) of an issued token.
//!
//! The machine has 2 cores and this load generator runs on them too: the
//! figures are for daemon + client together, as every benchmark here.
//! Prints a table and writes bench/out/oauth-results.json. Goals are
//! reported (BENCHMARKS.md), never asserted.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const P256_PEM: &[u8] = include_bytes!("../src/oauth/testdata/p256.pem");
const ED_PEM: &[u8] = include_bytes!("../src/oauth/testdata/ed25519_b.pem");
const IDP: &str = "https://idp.bench";

struct Args {
    bin: PathBuf,
    seconds: u64,
    connections: usize,
}

fn args() -> Args {
    let mut a = Args {
        bin: PathBuf::from("target/release/keyturn"),
        seconds: 10,
        connections: 32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--bin" => a.bin = v.into(),
            "--seconds" => a.seconds = v.parse().expect("--seconds N"),
            "--connections" => a.connections = v.parse().expect("--connections N"),
            _ => panic!("unknown argument {k} (--bin, --seconds, --connections)"),
        }
    }
    a
}

fn now() -> i64 {
    i64::try_from(jsonwebtoken::get_current_timestamp()).unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The key set of the identity provider: both keys, by kid.
fn idp_jwks() -> Value {
    let mut keys = Vec::new();
    for (pem, alg, kid) in [
        (ED_PEM, Algorithm::EdDSA, "ed"),
        (P256_PEM, Algorithm::ES256, "ec"),
    ] {
        let enc = idp_key(pem, alg);
        let mut jwk =
            serde_json::to_value(jsonwebtoken::jwk::Jwk::from_encoding_key(&enc, alg).unwrap())
                .unwrap();
        jwk["kid"] = json!(kid);
        keys.push(jwk);
    }
    json!({ "keys": keys })
}

fn idp_key(pem: &[u8], alg: Algorithm) -> EncodingKey {
    match alg {
        Algorithm::EdDSA => EncodingKey::from_ed_pem(pem).unwrap(),
        _ => EncodingKey::from_ec_pem(pem).unwrap(),
    }
}

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    base: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(bin: &Path) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    std::fs::write(dir.path().join("jwks.json"), idp_jwks().to_string()).unwrap();
    std::fs::create_dir_all(dir.path().join("agents")).unwrap();
    let config = format!(
        r#"[daemon]
state_dir = "{d}/state"
socket = "{d}/control.sock"
agent_socket = "{d}/agent.sock"
delivery_roots = ["{d}/agents"]
listen = "127.0.0.1:{port}"

[vaults.local]
type = "local"

[agents.bot]
owner = "bench@example.com"
tenant = "acme"
tier = "high"
auth_key = "auth"

[agents.bot.credentials.auth]
vault = "local"
every = "24h"
generate = {{ kind = "ed25519" }}
deliver = [{{ type = "file", path = "{d}/agents/bot/auth" }}]

[agents.keyturn]
owner = "ops@example.com"
tenant = "acme"
tier = "high"

[agents.keyturn.credentials.signer]
vault = "local"
every = "24h"
generate = {{ kind = "ed25519" }}
deliver = [{{ type = "file", path = "{d}/agents/keyturn/signer" }}]

[token_service]
issuer = "{base}"
signing_credential = "keyturn/signer"

[token_service.subject_issuers.corp]
issuer = "{IDP}"
audience = "keyturn"
algorithms = ["EdDSA", "ES256"]
jwks_file = "{d}/jwks.json"
tenant = "acme"

[token_service.clients.bot]
scopes = ["read:reports", "write:reports"]
audiences = ["https://api.bench"]
"#
    );
    let path = dir.path().join("keyturn.toml");
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
    let child = Command::new(bin)
        .arg("--config")
        .arg(&path)
        .arg("daemon")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let key = dir.path().join("agents/bot/auth/private.pem");
    let until = Instant::now() + Duration::from_secs(30);
    while !(key.exists()
        && dir
            .path()
            .join("agents/keyturn/signer/private.pem")
            .exists())
    {
        assert!(
            Instant::now() < until,
            "keys not delivered in 30 s; see {}/daemon.log",
            d
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Daemon { child, dir, base }
}

fn b64(v: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

/// A fresh private_key_jwt assertion of `bot`.
fn assertion(key: &EncodingKey, aud: &str, n: usize) -> String {
    let t = now();
    let claims = json!({
        "iss": "bot", "sub": "bot", "aud": aud, "iat": t, "exp": t + 240,
        "jti": format!("{n:x}-{}", b64(&rand::random::<[u8; 9]>())),
    });
    jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, key).unwrap()
}

fn subject_token(alg: Algorithm) -> String {
    let (pem, kid) = match alg {
        Algorithm::EdDSA => (ED_PEM, "ed"),
        _ => (P256_PEM, "ec"),
    };
    let mut h = Header::new(alg);
    h.typ = Some("at+jwt".into());
    h.kid = Some(kid.into());
    let t = now();
    let claims = json!({
        "iss": IDP, "sub": "alice@example.com", "aud": "keyturn", "iat": t, "exp": t + 3600,
        "scope": "read:reports write:reports admin",
    });
    jsonwebtoken::encode(&h, &claims, &idp_key(pem, alg)).unwrap()
}

fn exchange_body(key: &EncodingKey, base: &str, subject: &str, n: usize) -> String {
    form_urlencoded::Serializer::new(String::new())
        .append_pair(
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        )
        .append_pair("subject_token", subject)
        .append_pair(
            "subject_token_type",
            "urn:ietf:params:oauth:token-type:access_token",
        )
        .append_pair("actor_token", &assertion(key, base, 2 * n))
        .append_pair("actor_token_type", "urn:ietf:params:oauth:token-type:jwt")
        .append_pair(
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        )
        .append_pair("client_assertion", &assertion(key, base, 2 * n + 1))
        .append_pair("audience", "https://api.bench")
        .finish()
}

fn introspect_body(key: &EncodingKey, base: &str, token: &str, n: usize) -> String {
    form_urlencoded::Serializer::new(String::new())
        .append_pair("token", token)
        .append_pair(
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        )
        .append_pair("client_assertion", &assertion(key, base, n))
        .finish()
}

/// Signs `count` bodies on every core.
fn presign(count: usize, make: impl Fn(usize) -> String + Sync) -> Vec<String> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = count.div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let make = &make;
                s.spawn(move || {
                    (t * chunk..((t + 1) * chunk).min(count))
                        .map(make)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

#[derive(Debug, Default, Clone, serde::Serialize)]
struct Run {
    requests: usize,
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: usize,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// POSTs bodies (each once) to `url`: closed loop over `connections` when
/// `rate` is None, else scheduled at `rate`/s in all. Stops after
/// `seconds` or when the bodies run out.
async fn load(
    url: &str,
    bodies: Arc<Vec<String>>,
    connections: usize,
    seconds: u64,
    rate: Option<f64>,
) -> Run {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .build()
        .unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (client, bodies, next, url) =
            (client.clone(), bodies.clone(), next.clone(), url.to_owned());
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= bodies.len() {
                    break;
                }
                let scheduled = match rate {
                    Some(r) => start + Duration::from_secs_f64(i as f64 / r),
                    None => Instant::now(),
                };
                if scheduled >= deadline {
                    break;
                }
                tokio::time::sleep_until(scheduled.into()).await;
                let r = client
                    .post(&url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(bodies[i].clone())
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        lat.push(scheduled.elapsed());
                    }
                    Ok(r) => {
                        errors += 1;
                        if errors <= 3 {
                            eprintln!("{} {}", r.status(), r.text().await.unwrap_or_default());
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        if errors <= 3 {
                            eprintln!("request failed: {e}");
                        }
                    }
                }
            }
            (lat, errors)
        });
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    while let Some(r) = tasks.join_next().await {
        let (l, e) = r.unwrap();
        lat.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    Run {
        requests: lat.len(),
        per_second: lat.len() as f64 / elapsed,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        errors,
    }
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let a = args();
    let daemon = start(&a.bin);
    let pem = std::fs::read(daemon.dir.path().join("agents/bot/auth/private.pem")).unwrap();
    let key = EncodingKey::from_ed_pem(&pem).unwrap();
    let base = daemon.base.clone();
    let token_url = format!("{base}/oauth/token");
    // Sized for the closed loop at up to 15k/s, with room.
    let count = (15_000 * a.seconds as usize).max(20_000);
    let mut results = serde_json::Map::new();
    let mut rows = Vec::new();
    for alg in [Algorithm::EdDSA, Algorithm::ES256] {
        let subject = subject_token(alg);
        let t = Instant::now();
        let bodies = Arc::new(presign(count, |n| exchange_body(&key, &base, &subject, n)));
        eprintln!("{alg:?}: {count} bodies signed in {:.1?}", t.elapsed());
        let ticks = cpu_ticks(daemon.child.id());
        let closed = load(&token_url, bodies.clone(), a.connections, a.seconds, None).await;
        let cpu_ms = (cpu_ticks(daemon.child.id()) - ticks) as f64 * 10.0;
        let cpu_per_exchange_us = cpu_ms * 1000.0 / closed.requests.max(1) as f64;
        let rest: Vec<String> = bodies[closed.requests + closed.errors + a.connections..].to_vec();
        let half = (closed.per_second / 2.0).max(1.0);
        let open = load(
            &token_url,
            Arc::new(rest),
            a.connections,
            a.seconds,
            Some(half),
        )
        .await;
        let name = format!("{alg:?}");
        rows.push((
            name.clone(),
            closed.clone(),
            open.clone(),
            cpu_per_exchange_us,
        ));
        results.insert(
            name,
            json!({ "closed": closed, "half_load": open, "half_rate": half,
                    "daemon_cpu_us_per_exchange": cpu_per_exchange_us }),
        );
    }

    // Introspection of one issued token.
    let issued: Value = serde_json::from_str(
        &reqwest::Client::new()
            .post(&token_url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(exchange_body(
                &key,
                &base,
                &subject_token(Algorithm::EdDSA),
                usize::MAX / 4,
            ))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    let token = issued["access_token"].as_str().expect("a token").to_owned();
    let bodies = Arc::new(presign(count, |n| introspect_body(&key, &base, &token, n)));
    let intro = load(
        &format!("{base}/oauth/introspect"),
        bodies,
        a.connections,
        a.seconds,
        None,
    )
    .await;
    results.insert("introspect".into(), json!(intro));

    println!(
        "\nToken service, {} s windows, {} keep-alive connections (daemon + this client on 2 cores)\n",
        a.seconds, a.connections
    );
    println!(
        "| subject alg | exchanges/s | p50 ms | p99 ms | errors | daemon CPU/exchange | at half load: rate/s | p50 ms | p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, c, o, cpu) in &rows {
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {} | {:.0} µs | {:.0} | {:.2} | {:.2} |",
            c.per_second, c.p50_ms, c.p99_ms, c.errors, cpu, o.per_second, o.p50_ms, o.p99_ms
        );
    }
    println!(
        "\nintrospections/s: {:.0} (p50 {:.2} ms, p99 {:.2} ms, errors {})",
        intro.per_second, intro.p50_ms, intro.p99_ms, intro.errors
    );
    let eddsa = &rows[0];
    println!(
        "\ngoals: >= 10000 exchanges/s with EdDSA: {:.0} -> {}; p99 <= 5 ms at half load: {:.2} ms -> {}",
        eddsa.1.per_second,
        if eddsa.1.per_second >= 10_000.0 {
            "PASS"
        } else {
            "FAIL"
        },
        eddsa.2.p99_ms,
        if eddsa.2.p99_ms <= 5.0 {
            "PASS"
        } else {
            "FAIL"
        },
    );
    std::fs::create_dir_all("bench/out").unwrap();
    std::fs::write(
        "bench/out/oauth-results.json",
        serde_json::to_string_pretty(&Value::Object(results)).unwrap(),
    )
    .unwrap();
    drop(daemon);
}
