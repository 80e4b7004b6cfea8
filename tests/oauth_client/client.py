#!/usr/bin/env python3
"""An independent OAuth client of keyturn's token service (issue 16).

Written against the RFCs and the documented wire contract only, with
libraries that share no code with keyturn: PyJWT (with cryptography) signs
the agent's assertions and validates the issued token against the JWKS;
authlib checks the RFC 8414 metadata and validates the token a second time
as an RFC 9068 resource server would (through joserfc, its JOSE library).
HTTP is the standard library's urllib, with proxies ignored: the token
service is on loopback in tests.

Subcommands (each exits 0 on success and non-zero with one line on stderr
saying which check failed; no token is ever printed or put in a message):

  idp-init DIR               a stand-in identity provider: an ES256 signing
                             key (DIR/idp-key.pem) and DIR/jwks.json
  subject DIR ...            a subject token (the human's access token,
                             typ at+jwt) signed by that IdP, written to --out
  exchange ...               RFC 8414 discovery, RFC 8693 exchange with two
                             RFC 7523 assertions, then every check of the
                             response and of the issued token
  validate ...               validates a saved token against the JWKS again
                             (after a signing-key rotation)
  introspect ...             RFC 7662, with the same client authentication
  revoke ...                 RFC 7009, with the same client authentication

Tokens go to and come from files (mode 0600), never the command line or
stdout, so that a test can grep every output for them.

Needs: PyJWT[crypto] and authlib (scripts/services.sh installs them into the
test services' venv).
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings

try:
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
except ImportError as e:  # pragma: no cover - a setup problem, said clearly
    sys.exit(
        f"client.py: {e}: this needs PyJWT[crypto] (bash scripts/services.sh start installs it "
        "into target/test-services/venv)"
    )
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from authlib.oauth2.rfc8414 import AuthorizationServerMetadata
        from authlib.oauth2.rfc9068.claims import JWTAccessTokenClaims
        from joserfc import jwt as jose_jwt
        from joserfc.jwk import KeySet
except ImportError as e:  # pragma: no cover
    sys.exit(
        f"client.py: {e}: this needs authlib (bash scripts/services.sh start installs it "
        "into target/test-services/venv)"
    )

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
TT_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
TT_JWT = "urn:ietf:params:oauth:token-type:jwt"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Claims every issued token must carry (RFC 9068 2.2, plus the contract's).
REQUIRED_CLAIMS = ["iss", "sub", "aud", "exp", "iat", "jti", "client_id", "scope", "act"]
# Loopback only: never through a proxy.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class CheckFailed(Exception):
    """One check failed; the message says which, never quoting a token."""


def check(cond, message):
    if not cond:
        raise CheckFailed(message)


# --- files -------------------------------------------------------------------


def write_private(path, data):
    """Writes `data` to a new file readable by its owner only."""
    if isinstance(data, str):
        data = data.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def read_token(path):
    with open(path, encoding="ascii") as f:
        token = f.read().strip()
    check(token.count(".") == 2, f"{path} does not hold a compact JWS")
    return token


# --- HTTP --------------------------------------------------------------------


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self, what):
        ctype = self.headers.get("Content-Type", "")
        check(
            ctype.split(";")[0].strip().lower() == "application/json",
            f"{what}: Content-Type is {ctype!r}, not application/json",
        )
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise CheckFailed(f"{what}: the body is not JSON: {e}") from None


def http(method, url, form=None):
    data = None
    headers = {"Accept": "application/json"}
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with OPENER.open(req, timeout=10) as r:
            return Response(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Response(e.code, e.headers, e.read())
    except urllib.error.URLError as e:
        raise CheckFailed(f"{method} {url}: {e.reason}") from None


def oauth_error(resp):
    """`error: error_description` of an error answer, for messages."""
    try:
        body = json.loads(resp.body)
        return f"{body.get('error')}: {body.get('error_description')}"
    except ValueError:
        return f"(not JSON, {len(resp.body)} bytes)"


def no_store(resp, what):
    cc = [d.strip().lower() for d in resp.headers.get("Cache-Control", "").split(",")]
    check("no-store" in cc, f"{what}: Cache-Control is {resp.headers.get('Cache-Control')!r}, lacks no-store")


# --- discovery ---------------------------------------------------------------


def discover(metadata_url):
    """RFC 8414: the metadata, checked by authlib and against its URL."""
    resp = http("GET", metadata_url)
    check(resp.status == 200, f"metadata: GET {metadata_url} answered {resp.status}")
    meta = resp.json("metadata")
    # Every one of authlib's RFC 8414 checks but one: a token service
    # without an authorization endpoint supports no response type, and
    # authlib takes the honest `[]` for a missing member. The member is
    # REQUIRED (RFC 8414 2), so it must be there, as a list.
    check(
        isinstance(meta.get("response_types_supported"), list),
        "metadata has no response_types_supported list (RFC 8414 2: REQUIRED)",
    )
    model = AuthorizationServerMetadata(meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in dir(model):
            if name.startswith("validate_") and name != "validate_response_types_supported":
                try:
                    getattr(model, name)()
                except ValueError as e:
                    raise CheckFailed(f"metadata is not valid RFC 8414 (authlib {name}): {e}") from None
    # RFC 8414 3.3: the issuer is the URL the metadata was fetched from,
    # less the well-known part, exactly; for an issuer with a path, the
    # well-known part comes between the host and the path (3.1).
    well_known = "/.well-known/oauth-authorization-server"
    parts = urllib.parse.urlsplit(metadata_url)
    check(
        parts.path.startswith(well_known) and not parts.query and not parts.fragment,
        f"{metadata_url} is not a {well_known} URL",
    )
    issuer = f"{parts.scheme}://{parts.netloc}{parts.path[len(well_known):]}"
    check(meta["issuer"] == issuer, f"metadata issuer {meta['issuer']!r} is not {issuer!r} (RFC 8414 3.3)")
    for key in ("token_endpoint", "jwks_uri", "introspection_endpoint", "revocation_endpoint"):
        check(isinstance(meta.get(key), str), f"metadata has no {key}")
    check(GRANT_TYPE in meta.get("grant_types_supported", []), "metadata: token exchange is not a supported grant type")
    check(
        "private_key_jwt" in meta.get("token_endpoint_auth_methods_supported", []),
        "metadata: private_key_jwt is not a token endpoint auth method",
    )
    check(
        "EdDSA" in meta.get("token_endpoint_auth_signing_alg_values_supported", []),
        "metadata: EdDSA is not a token endpoint auth signing algorithm",
    )
    return meta


def fetch_jwks(jwks_uri):
    resp = http("GET", jwks_uri)
    check(resp.status == 200, f"jwks: GET {jwks_uri} answered {resp.status}")
    jwks = resp.json("jwks")
    check(isinstance(jwks.get("keys"), list) and jwks["keys"], "jwks: no keys")
    for k in jwks["keys"]:
        check(
            k.get("kty") == "OKP" and k.get("crv") == "Ed25519" and "d" not in k,
            f"jwks: key {k.get('kid')!r} is not a public OKP/Ed25519 key",
        )
        check(isinstance(k.get("kid"), str) and k["kid"], "jwks: a key without kid")
    return jwks


# --- the agent's assertions (RFC 7523) ----------------------------------------


def load_agent_key(path):
    with open(path, "rb") as f:
        pem = f.read()
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except ValueError as e:
        # What a PKCS#8 v2 key (with the public key) gives: OpenSSL 3 and
        # cryptography read only v1, which keyturn delivers.
        raise CheckFailed(f"cannot load the agent's key {path}: {e}") from None
    check(isinstance(key, ed25519.Ed25519PrivateKey), f"{path} is not an Ed25519 private key")
    return key


def assertion(key, agent, audience, lifetime=60):
    """A fresh private_key_jwt assertion: iss = sub = the agent, a unique jti."""
    now = int(time.time())
    claims = {
        "iss": agent,
        "sub": agent,
        "aud": audience,
        "iat": now,
        "exp": now + lifetime,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"typ": "JWT"})


def client_auth(key, agent, audience):
    return {
        "client_id": agent,
        "client_assertion_type": CLIENT_ASSERTION_TYPE,
        "client_assertion": assertion(key, agent, audience),
    }


# --- validating an issued token -----------------------------------------------


def validate_token(token, jwks, issuer, audience, leeway=0):
    """The token checked as a resource server would, twice: PyJWT, then
    authlib's RFC 9068 claims over joserfc. Returns (header, claims)."""
    header = jwt.get_unverified_header(token)
    check(header.get("alg") == "EdDSA", f"token alg is {header.get('alg')!r}, not EdDSA")
    typ = str(header.get("typ", "")).lower()
    check(typ in ("at+jwt", "application/at+jwt"), f"token typ is {header.get('typ')!r}, not at+jwt (RFC 9068 2.1)")
    kid = header.get("kid")
    check(isinstance(kid, str) and kid, "token header has no kid")
    keyset = jwt.PyJWKSet.from_dict(jwks)
    matching = [k for k in keyset.keys if k.key_id == kid]
    check(matching, f"the JWKS publishes no key with the token's kid {kid!r} (kids: {[k.key_id for k in keyset.keys]})")
    try:
        claims = jwt.decode(
            token,
            matching[0],
            algorithms=["EdDSA"],
            audience=audience,
            issuer=issuer,
            leeway=leeway,
            options={"require": REQUIRED_CLAIMS},
        )
    except jwt.PyJWTError as e:
        raise CheckFailed(f"PyJWT refuses the token: {type(e).__name__}: {e}") from None

    # The same with authlib. joserfc treats the polymorphic "EdDSA" as not
    # recommended since RFC 9864 (which registers "Ed25519"), so it is named
    # explicitly, as a resource server pinned to this issuer would.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            decoded = jose_jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["EdDSA"])
            options = {
                "iss": {"essential": True, "value": issuer},
                "aud": {"essential": True, "value": audience},
                "exp": {"essential": True},
                "iat": {"essential": True},
                "sub": {"essential": True},
                "jti": {"essential": True},
                "client_id": {"essential": True},
            }
            JWTAccessTokenClaims(decoded.claims, decoded.header, options).validate(leeway=leeway)
        except Exception as e:  # joserfc's and authlib's errors have no common base
            raise CheckFailed(f"authlib refuses the token: {type(e).__name__}: {e}") from None
    check(decoded.claims == claims, "authlib and PyJWT decoded different claims")
    return header, claims


def check_claims(claims, args):
    """The delegation: who, for whom, what, where."""
    if args.expect_sub is not None:
        check(claims["sub"] == args.expect_sub, f"sub is {claims['sub']!r}, not {args.expect_sub!r}")
    check(claims["client_id"] == args.agent, f"client_id is {claims['client_id']!r}, not {args.agent!r}")
    act = claims["act"]
    check(isinstance(act, dict) and act.get("sub") == args.agent, f"act is {act!r}: act.sub must be {args.agent!r}")
    if args.expect_act is not None:
        expected = json.loads(args.expect_act)
        check(act == expected, f"act is {json.dumps(act)}, not {json.dumps(expected)}")
    if args.expect_scope is not None:
        check(
            claims["scope"] == args.expect_scope,
            f"scope is {claims['scope']!r}, not {args.expect_scope!r}",
        )
    if args.expect_tenant is not None:
        check(claims.get("tenant") == args.expect_tenant, f"tenant is {claims.get('tenant')!r}, not {args.expect_tenant!r}")


# --- subcommands --------------------------------------------------------------


def cmd_idp_init(args):
    os.makedirs(args.dir, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(os.path.join(args.dir, "idp-key.pem"), pem)
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid=args.kid, alg="ES256", use="sig")
    with open(os.path.join(args.dir, "jwks.json"), "w") as f:
        json.dump({"keys": [jwk]}, f)
    print(json.dumps({"kid": args.kid, "jwks": os.path.join(args.dir, "jwks.json")}))


def cmd_subject(args):
    with open(os.path.join(args.dir, "idp-key.pem"), "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    with open(os.path.join(args.dir, "jwks.json")) as f:
        kid = json.load(f)["keys"][0]["kid"]
    now = int(time.time())
    claims = {
        "iss": args.iss,
        "sub": args.sub,
        "aud": args.aud,
        "iat": now,
        "exp": now + args.ttl,
        "jti": uuid.uuid4().hex,
        "scope": args.scope,
    }
    if args.act:
        claims["act"] = json.loads(args.act)
    token = jwt.encode(claims, key, algorithm="ES256", headers={"typ": "at+jwt", "kid": kid})
    write_private(args.out, token)
    print(json.dumps({"sub": args.sub, "jti": claims["jti"], "exp": claims["exp"]}))


def cmd_assertion(args):
    """An agent assertion (for an actor token sent another way: the CLI)."""
    issuer = discover(args.metadata)["issuer"]
    token = assertion(load_agent_key(args.key), args.agent, issuer, args.lifetime)
    write_private(args.out, token)
    print(json.dumps({"aud": issuer, "lifetime": args.lifetime}))


def cmd_exchange(args):
    meta = discover(args.metadata)
    issuer = meta["issuer"]
    key = load_agent_key(args.key)
    subject_token = read_token(args.subject_token_file)
    # Two assertions, distinct jti: the client authentication names the
    # token endpoint as audience, the actor token the issuer (RFC 7523 3
    # allows both; the service must accept each).
    form = [
        ("grant_type", GRANT_TYPE),
        ("subject_token", subject_token),
        ("subject_token_type", TT_ACCESS_TOKEN),
        ("actor_token", assertion(key, args.agent, issuer)),
        ("actor_token_type", TT_JWT),
        ("requested_token_type", TT_ACCESS_TOKEN),
    ]
    form += [("audience", a) for a in args.audience]
    if args.scope is not None:
        form.append(("scope", args.scope))
    form += list(client_auth(key, args.agent, meta["token_endpoint"]).items())
    resp = http("POST", meta["token_endpoint"], form)
    check(resp.status == 200, f"token endpoint answered {resp.status}: {oauth_error(resp)}")
    no_store(resp, "token response")
    pragma = resp.headers.get("Pragma", "").strip().lower()
    check(pragma == "no-cache", f"token response: Pragma is {pragma!r}, not no-cache")
    body = resp.json("token response")
    # RFC 8693 2.2.1: the fields, and the issued token type.
    for field in ("access_token", "issued_token_type", "token_type", "expires_in", "scope"):
        check(field in body, f"token response has no {field}")
    check(body["issued_token_type"] == TT_ACCESS_TOKEN, f"issued_token_type is {body['issued_token_type']!r}")
    check(body["token_type"].lower() == "bearer", f"token_type is {body['token_type']!r}, not Bearer")
    check(
        isinstance(body["expires_in"], int) and body["expires_in"] > 0,
        f"expires_in is {body['expires_in']!r}, not a positive integer",
    )
    check("refresh_token" not in body, "a refresh token was issued")
    token = body["access_token"]
    check(isinstance(token, str) and token.count(".") == 2, "access_token is not a compact JWS")

    jwks = fetch_jwks(meta["jwks_uri"])
    expected_aud = args.audience[0] if args.audience else args.expect_aud
    check(expected_aud is not None, "give --audience or --expect-aud: the audience to validate against")
    header, claims = validate_token(token, jwks, issuer, expected_aud)
    check_claims(claims, args)
    check(claims["scope"] == body["scope"], f"the response's scope {body['scope']!r} is not the token's {claims['scope']!r}")
    lifetime = claims["exp"] - claims["iat"]
    check(
        abs(lifetime - body["expires_in"]) <= 2,
        f"expires_in {body['expires_in']} does not match the token's lifetime {lifetime}",
    )
    if args.max_lifetime is not None:
        check(lifetime <= args.max_lifetime, f"the token lives {lifetime}s, more than {args.max_lifetime}s")
    if args.token_out:
        write_private(args.token_out, token)
    print(
        json.dumps(
            {
                "kid": header["kid"],
                "header": header,
                "claims": claims,
                "expires_in": body["expires_in"],
                "scope": body["scope"],
                "jwks_kids": [k["kid"] for k in jwks["keys"]],
            },
            sort_keys=True,
        )
    )


def cmd_validate(args):
    meta = discover(args.metadata)
    jwks = fetch_jwks(meta["jwks_uri"])
    header, claims = validate_token(read_token(args.token_file), jwks, meta["issuer"], args.audience)
    if args.expect_kid is not None:
        check(header["kid"] == args.expect_kid, f"kid is {header['kid']!r}, not {args.expect_kid!r}")
    print(
        json.dumps(
            {"kid": header["kid"], "claims": claims, "jwks_kids": [k["kid"] for k in jwks["keys"]]},
            sort_keys=True,
        )
    )


def cmd_introspect(args):
    meta = discover(args.metadata)
    key = load_agent_key(args.key)
    token = read_token(args.token_file)
    form = [("token", token), ("token_type_hint", "access_token")]
    form += list(client_auth(key, args.agent, meta["issuer"]).items())
    resp = http("POST", meta["introspection_endpoint"], form)
    check(resp.status == 200, f"introspection answered {resp.status}: {oauth_error(resp)}")
    no_store(resp, "introspection response")
    body = resp.json("introspection response")
    check(isinstance(body.get("active"), bool), "introspection response has no boolean active (RFC 7662 2.2)")
    if args.expect_active == "false":
        # RFC 7662 2.2: an inactive token reveals nothing more.
        check(body == {"active": False}, f"an inactive token's introspection says more than active=false: {sorted(body)}")
    elif args.expect_active == "true":
        check(body["active"] is True, "introspection says the token is not active")
        _, claims = validate_token(token, fetch_jwks(meta["jwks_uri"]), meta["issuer"], args.audience)
        for field in ("iss", "sub", "aud", "exp", "iat", "jti", "client_id", "scope", "act", "tenant"):
            check(body.get(field) == claims.get(field), f"introspection's {field} {body.get(field)!r} is not the token's {claims.get(field)!r}")
        check(str(body.get("token_type", "")).lower() == "bearer", f"introspection token_type is {body.get('token_type')!r}")
    print(json.dumps(body, sort_keys=True))


def cmd_revoke(args):
    meta = discover(args.metadata)
    key = load_agent_key(args.key)
    form = [("token", read_token(args.token_file)), ("token_type_hint", "access_token")]
    form += list(client_auth(key, args.agent, meta["issuer"]).items())
    resp = http("POST", meta["revocation_endpoint"], form)
    check(resp.status == 200, f"revocation answered {resp.status}: {oauth_error(resp)}")
    print(json.dumps({"revoked": True, "status": resp.status}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("idp-init", help="a stand-in identity provider's key and JWKS")
    s.add_argument("dir")
    s.add_argument("--kid", default="idp-1")
    s.set_defaults(func=cmd_idp_init)

    s = sub.add_parser("subject", help="a subject token from that identity provider")
    s.add_argument("dir")
    s.add_argument("--sub", required=True)
    s.add_argument("--scope", required=True)
    s.add_argument("--aud", required=True)
    s.add_argument("--iss", required=True)
    s.add_argument("--act", help="an act claim (JSON) the subject token already carries")
    s.add_argument("--ttl", type=int, default=600)
    s.add_argument("--out", required=True, help="file the token is written to (0600)")
    s.set_defaults(func=cmd_subject)

    def agent_args(s):
        s.add_argument("--metadata", required=True, help="the RFC 8414 metadata URL")
        s.add_argument("--agent", required=True)
        s.add_argument("--key", required=True, help="the agent's delivered Ed25519 PKCS#8 PEM")

    s = sub.add_parser("assertion", help="an agent assertion for the issuer, to a file")
    agent_args(s)
    s.add_argument("--lifetime", type=int, default=60)
    s.add_argument("--out", required=True, help="file the assertion is written to (0600)")
    s.set_defaults(func=cmd_assertion)

    s = sub.add_parser("exchange", help="RFC 8693 token exchange, every check")
    agent_args(s)
    s.add_argument("--subject-token-file", required=True)
    s.add_argument("--audience", action="append", default=[])
    s.add_argument("--scope")
    s.add_argument("--expect-aud")
    s.add_argument("--expect-sub")
    s.add_argument("--expect-scope")
    s.add_argument("--expect-act", help="the whole act claim expected (JSON)")
    s.add_argument("--expect-tenant")
    s.add_argument("--max-lifetime", type=int)
    s.add_argument("--token-out", help="write the issued token here (0600) for later steps")
    s.set_defaults(func=cmd_exchange)

    s = sub.add_parser("validate", help="validate a saved token against the current JWKS")
    s.add_argument("--metadata", required=True)
    s.add_argument("--token-file", required=True)
    s.add_argument("--audience", required=True)
    s.add_argument("--expect-kid")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("introspect", help="RFC 7662 introspection")
    agent_args(s)
    s.add_argument("--token-file", required=True)
    s.add_argument("--audience", help="for --expect-active true: the token's audience")
    s.add_argument("--expect-active", choices=["true", "false"])
    s.set_defaults(func=cmd_introspect)

    s = sub.add_parser("revoke", help="RFC 7009 revocation")
    agent_args(s)
    s.add_argument("--token-file", required=True)
    s.set_defaults(func=cmd_revoke)

    args = p.parse_args()
    if args.cmd == "introspect" and args.expect_active == "true" and not args.audience:
        p.error("introspect --expect-active true needs --audience")
    try:
        args.func(args)
    except CheckFailed as e:
        sys.exit(f"client.py {args.cmd}: FAILED: {e}")


if __name__ == "__main__":
    main()
