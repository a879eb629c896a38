"""``tlsproxy certs …``: argument parsing and printing; the work is in build/store/verify.

Every command prints what it wrote and the next command to use it with. Failures are
PKIError (exit 1) or UsageError (exit 2), turned into one line by ``proxy.cli``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from cryptography import x509

from proxy.errors import PKIError, UsageError
from proxy.pki import build, store
from proxy.pki.inspect import CSR_JSON_KEYS, JSON_KEYS, inspect_file, render_text, rfc3339
from proxy.pki.names import name_text, parse_names
from proxy.pki import trust_stores
from proxy.pki.trust import trust_instructions
from proxy.pki.verify import PURPOSES, shallow_wildcards, verify_certificate


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    certs = subparsers.add_parser("certs", help="a private PKI: CA, server/client certs, inspect, verify, trust")
    commands = certs.add_subparsers(dest="certs_command", metavar="COMMAND")
    commands.required = True

    ca = _command(commands, "ca", cmd_ca, "create a CA (DIR/ca.pem, DIR/ca.key)")
    ca.add_argument("--dir", required=True, type=Path, help="folder for ca.pem and ca.key")
    ca.add_argument("--name", default=build.DEFAULT_CA_NAME, help="the CA's common name")
    _days(ca, 3650)
    _key_type(ca)
    _force(ca)

    issue = _command(commands, "issue", cmd_issue, "issue a server (or --client) certificate from a CA")
    issue.add_argument("--ca", required=True, type=Path, metavar="DIR", help="CA folder (from `certs ca`)")
    _out_prefix(issue, "PREFIX.pem, PREFIX.key (and PREFIX.p12 with --p12)")
    issue.add_argument("--client", action="store_true", help="client certificate (EKU clientAuth)")
    _subject(issue)
    _days(issue, 365)
    _key_type(issue)
    issue.add_argument("--p12", action="store_true", help="also write PREFIX.p12 (PKCS#12)")
    issue.add_argument("--p12-password", metavar="PW", help=f"PKCS#12 password (default {store.DEFAULT_P12_PASSWORD!r})")
    broken = issue.add_mutually_exclusive_group()
    broken.add_argument("--expired", action="store_true", help="validity ended yesterday (for negative tests)")
    broken.add_argument("--not-yet-valid", action="store_true", help="validity starts tomorrow (for negative tests)")
    _force(issue)
    _names(issue)

    self_signed = _command(commands, "self-signed", cmd_self_signed, "one self-signed server certificate")
    _out_prefix(self_signed)
    self_signed.add_argument("--cn", help="common name (default: the first NAME)")
    _days(self_signed, 365)
    _key_type(self_signed)
    _force(self_signed)
    _names(self_signed)

    csr = _command(commands, "csr", cmd_csr, "a key and a CSR (PREFIX.csr) for another CA")
    _out_prefix(csr, "PREFIX.csr and PREFIX.key")
    _subject(csr)
    _key_type(csr)
    _force(csr)
    _names(csr)

    sign = _command(commands, "sign", cmd_sign, "sign a CSR with a CA, keeping its subject and SANs")
    sign.add_argument("csr", type=Path, metavar="CSR")
    sign.add_argument("--ca", required=True, type=Path, metavar="DIR", help="CA folder (from `certs ca`)")
    sign.add_argument("--out", required=True, type=Path, metavar="FILE", help="certificate file (leaf then CA)")
    sign.add_argument("--client", action="store_true", help="client certificate (EKU clientAuth)")
    _days(sign, 365)
    _force(sign)

    inspect = _command(commands, "inspect", cmd_inspect, "show what certificates and CSRs say (PEM, DER, PKCS#12)")
    inspect.add_argument("files", nargs="+", type=Path, metavar="FILE")
    inspect.add_argument("--json", action="store_true", help="a JSON list, one object per certificate")
    inspect.add_argument("--password", metavar="PW", help="PKCS#12 password (default: try none, then 'changeit')")

    verify = _command(commands, "verify", cmd_verify, "would a TLS client accept this certificate?")
    verify.add_argument("cert", type=Path, metavar="CERT", help="leaf (then any intermediates); PEM, DER or P12")
    verify.add_argument("--ca", required=True, type=Path, metavar="CAFILE", help="trusted CA bundle (or CA folder)")
    verify.add_argument("--host", metavar="NAME", help="hostname or IP the client connects to")
    verify.add_argument("--purpose", choices=PURPOSES, default="server", help="default: server")
    verify.add_argument("--crl", type=Path, metavar="FILE", help="also refuse certificates this CRL revokes")
    verify.add_argument("--password", metavar="PW", help="PKCS#12 password")

    trust = _command(commands, "trust", cmd_trust,
                     "how to make clients trust a CA, or --install / --uninstall / --check it in trust stores")
    trust.add_argument("--ca", required=True, type=Path, metavar="CAFILE", help="the CA certificate (or CA folder)")
    action = trust.add_mutually_exclusive_group()
    action.add_argument("--install", dest="action", action="store_const", const="install",
                        help="add it to every trust store found (or those of --store)")
    action.add_argument("--uninstall", dest="action", action="store_const", const="uninstall",
                        help="remove what --install added")
    action.add_argument("--check", dest="action", action="store_const", const="check",
                        help="exit 0 when every store found trusts it")
    trust.add_argument("--store", type=_store_list, metavar="system,nss,java",
                       help="only these stores (default: all): system (OS), nss (browsers), java (cacerts)")

    crl = _command(commands, "crl", cmd_crl, "write a CRL revoking the given certificates (extension)")
    crl.add_argument("--ca", required=True, type=Path, metavar="DIR", help="CA folder (from `certs ca`)")
    crl.add_argument("--out", required=True, type=Path, metavar="FILE", help="PEM CRL to write")
    crl.add_argument("certs", nargs="*", type=Path, metavar="CERT", help="certificates to revoke")
    _days(crl, 30, what="days until the CRL's nextUpdate")
    _force(crl)


# --- commands ------------------------------------------------------------------------


def cmd_ca(args: argparse.Namespace) -> int:
    cert, key = build.create_ca(args.name, days=args.days, key_type=args.key_type)
    created = _missing_folder(args.dir / store.CA_CERT_FILE)
    pem_path, key_path = store.write_ca(args.dir, cert, key, force=args.force)
    _say(
        *_created(created),
        f"wrote {pem_path}  (CA '{cert.subject.rfc4514_string()}', valid until {_until(cert)})",
        f"wrote {key_path}  (CA private key, mode 0600: keep it secret)",
        "next:",
        f"  tlsproxy certs issue --ca {_q(args.dir)} --out {_q(args.dir.parent / 'localhost')} localhost 127.0.0.1 ::1",
        f"  tlsproxy certs trust --ca {_q(pem_path)}",
    )
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    if args.p12_password is not None and not args.p12:
        raise UsageError("--p12-password needs --p12")
    parse_names(args.names)  # refuse a bad NAME before touching the CA
    ca_cert, ca_key = store.load_ca(args.ca)
    not_before, not_after = build.validity_window(args.days, expired=args.expired, not_yet_valid=args.not_yet_valid)
    cert, key = build.issue_leaf(
        ca_cert, ca_key, args.names, client=args.client, cn=args.cn, ou=args.ou,
        key_type=args.key_type, not_before=not_before, not_after=not_after,
    )
    p12_path = store.suffixed(args.out, ".p12") if args.p12 else None
    store.ensure_free([p for p in [p12_path] if p], force=args.force)
    created = _missing_folder(args.out)
    pem_path, key_path = store.write_leaf(args.out, cert, key, [ca_cert], force=args.force)
    lines = _created(created) + _wrote_leaf(cert, pem_path, key_path, args.client)
    lines += _wildcard_notes(args.names)
    if args.expired or args.not_yet_valid:
        lines.append(f"note: deliberately {'expired' if args.expired else 'not yet valid'} (for negative tests)")
    if p12_path:
        password = args.p12_password if args.p12_password is not None else store.DEFAULT_P12_PASSWORD
        store.write_p12(p12_path, cert, key, [ca_cert], password, force=args.force)
        lines.append(_wrote_p12(p12_path, password, default=args.p12_password is None))
    lines += _usage(cert, pem_path, key_path, ca_pem=Path(args.ca) / store.CA_CERT_FILE, client=args.client)
    _say(*lines)
    return 0


def cmd_self_signed(args: argparse.Namespace) -> int:
    cert, key = build.self_signed(args.names, cn=args.cn, days=args.days, key_type=args.key_type)
    created = _missing_folder(args.out)
    pem_path, key_path = store.write_leaf(args.out, cert, key, [], force=args.force)
    lines = _created(created) + _wrote_leaf(cert, pem_path, key_path, client=False)
    lines += _wildcard_notes(args.names)
    lines.append("note: self-signed: clients must trust this very file (it is its own CA)")
    lines += _usage(cert, pem_path, key_path, ca_pem=pem_path, client=False)
    _say(*lines)
    return 0


def cmd_csr(args: argparse.Namespace) -> int:
    csr, key = build.make_csr(args.names, cn=args.cn, ou=args.ou, key_type=args.key_type)
    created = _missing_folder(args.out)
    csr_path, key_path = store.write_csr(args.out, csr, key, force=args.force)
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    _say(
        *_created(created),
        f"wrote {csr_path}  (CSR for '{csr.subject.rfc4514_string()}', {', '.join(name_text(n) for n in sans)})",
        f"wrote {key_path}  (private key, mode 0600: it never leaves this machine)",
        "next: send the CSR to your CA, or sign it with a tlsproxy CA:",
        f"  tlsproxy certs sign {_q(csr_path)} --ca certs/ca --out {_q(store.suffixed(args.out, '.pem'))}",
    )
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    csr = store.load_csr(args.csr)
    ca_cert, ca_key = store.load_ca(args.ca)
    cert = build.sign_csr(ca_cert, ca_key, csr, client=args.client, days=args.days)
    created = _missing_folder(args.out)
    path = store.write_atomic(args.out, store.certs_pem([cert, ca_cert]), force=args.force)
    _say(
        *_created(created),
        f"wrote {path}  ({_summary(cert, args.client)})",
        "use it with the key that made the CSR"
        + (f", e.g. {_q(args.csr.with_suffix('.key'))}" if args.csr.with_suffix(".key").exists() else ""),
        f"check:  tlsproxy certs verify {_q(path)} --ca {_q(Path(args.ca) / store.CA_CERT_FILE)}"
        + (" --purpose client" if args.client else ""),
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    described = [info for path in args.files for info in inspect_file(path, password=args.password)]
    if args.json:
        def public(info: dict) -> dict:
            keys = (*(CSR_JSON_KEYS if info.get("kind") == "csr" else JSON_KEYS), "key_matches")
            return {k: info[k] for k in keys if k in info}

        print(json.dumps([public(info) for info in described], indent=2))
        return 0
    blocks = []
    for path in args.files:
        mine = [info for info in described if info["file"] == str(path)]
        blocks += [render_text(info, index=i, total=len(mine)) for i, info in enumerate(mine, 1)]
    print("\n\n".join(dict.fromkeys(blocks)))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if args.host is not None and args.purpose == "client":
        raise UsageError("--host applies to --purpose server only")
    certs = store.load_certificates(args.cert, password=args.password)
    roots = store.load_certificates(_ca_file(args.ca))
    crl = store.load_crl(args.crl) if args.crl else None
    result = verify_certificate(
        certs[0], roots, intermediates=certs[1:], host=args.host, purpose=args.purpose, crl=crl
    )
    path = " <- ".join(f"'{c.subject.rfc4514_string()}'" for c in result.chain)
    target = f" for {args.host}" if args.host else ""
    _say(f"OK: {args.cert} is a valid {args.purpose} certificate{target} (chain: {path})")
    return 0


def cmd_trust(args: argparse.Namespace) -> int:
    ca_pem = _ca_file(args.ca)
    if args.action is None:
        if args.store is not None:
            raise UsageError("--store needs --install, --uninstall or --check")
        ca_cert = store.load_certificates(ca_pem)[0]
        print(trust_instructions(ca_pem, ca_cert))
        return 0
    outcomes = trust_stores.apply(args.action, ca_pem, args.store or tuple(trust_stores.STORES))
    _say(*(outcome.line() for outcome in outcomes))
    code = trust_stores.exit_code(args.action, outcomes)
    if args.action == "install" and code == 0:
        _say("restart browsers to pick it up; Python requests/httpx use certifi unless told otherwise: "
             f"REQUESTS_CA_BUNDLE={_q(ca_pem)}; Node needs NODE_EXTRA_CA_CERTS={_q(ca_pem)}")
    if code != 0:
        raise PKIError(_trust_failure(args.action, outcomes))
    return 0


def _trust_failure(action: str, outcomes: list) -> str:
    failed = [o.store for o in outcomes if o.status is trust_stores.Status.FAILED]
    if failed:
        return f"trust --{action}: {', '.join(dict.fromkeys(failed))} could not be changed (see above)"
    if any(o.status is trust_stores.Status.NOT_TRUSTED for o in outcomes):
        return "trust --check: not every store found trusts this CA (see above)"
    return "trust --check: no trust store could be checked (see above)"


def _store_list(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in trust_stores.STORES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown store {', '.join(map(repr, unknown)) or repr(text)}; choose from {','.join(trust_stores.STORES)}"
        )
    return names


def cmd_crl(args: argparse.Namespace) -> int:
    ca_cert, ca_key = store.load_ca(args.ca)
    revoked = [store.load_certificates(path)[0] for path in args.certs]
    foreign = [str(p) for p, c in zip(args.certs, revoked) if c.issuer != ca_cert.subject]
    if foreign:
        raise PKIError(f"not issued by this CA: {', '.join(foreign)}")
    crl = build.make_crl(ca_cert, ca_key, [c.serial_number for c in revoked], days=args.days)
    created = _missing_folder(args.out)
    path = store.write_crl(args.out, crl, force=args.force)
    _say(
        *_created(created),
        f"wrote {path}  (CRL from '{ca_cert.subject.rfc4514_string()}', {len(revoked)} revoked, "
        f"next update {rfc3339(crl.next_update_utc)})",
        *[f"  revoked {format(c.serial_number, 'x')}  {c.subject.rfc4514_string()}" for c in revoked],
        # absolute: a relative path in a config resolves against the config file's folder
        f"use it:  client_auth: {{crl: {path.absolute()}}} in proxy.yaml, or "
        f"tlsproxy certs verify CERT --ca {_q(Path(args.ca) / store.CA_CERT_FILE)} --crl {_q(path)}",
    )
    return 0


# --- helpers -------------------------------------------------------------------------


def _command(commands, name: str, func, help_text: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(func=_guarded(func))
    return parser


def _guarded(func):
    """cryptography reports bad values as ValueError: make those one-line errors too."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except ValueError as exc:
            raise PKIError(str(exc)) from None

    return run


def _days(parser: argparse.ArgumentParser, default: int, what: str = "validity in days") -> None:
    parser.add_argument("--days", type=_positive_int, default=default, metavar="N", help=f"{what} (default {default})")


def _key_type(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key-type", choices=build.KEY_TYPES, default="ec", help="default: ec (P-256)")


def _force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="overwrite existing files")


def _out_prefix(parser: argparse.ArgumentParser, writes: str = "PREFIX.pem and PREFIX.key") -> None:
    parser.add_argument("--out", required=True, type=Path, metavar="PREFIX",
                        help=f"writes {writes} (a missing folder is created, and said so)")


def _subject(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cn", help="common name (default: the first NAME)")
    parser.add_argument("--ou", help="organizational unit (for allow-lists by OU)")


def _names(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "names", nargs="+", metavar="NAME",
        help="DNS name (wildcards ok), IP, uri:URI or spiffe://…, or email; the first is the CN",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _missing_folder(path: Path) -> Path | None:
    """``path``'s folder when it does not exist yet (writing creates it, parents too)."""
    folder = Path(path).parent
    return None if folder.exists() else folder


def _created(folder: Path | None) -> list[str]:
    """Say so when writing created a folder: a typo in --out should not go unnoticed."""
    return [] if folder is None else [f"created folder {folder}/ (it did not exist)"]


def _ca_file(path: Path) -> Path:
    """Accept a CA folder (from `certs ca`) where a CA file is expected."""
    return path / store.CA_CERT_FILE if path.is_dir() else path


def _wrote_leaf(cert: x509.Certificate, pem_path: Path, key_path: Path, client: bool) -> list[str]:
    chain = "certificate then CA chain" if cert.issuer != cert.subject else "certificate"
    return [
        f"wrote {pem_path}  ({chain}: {_summary(cert, client)})",
        f"wrote {key_path}  (private key, mode 0600)",
    ]


def _wildcard_notes(names: list[str]) -> list[str]:
    return [
        f"note: {name} will not match in curl/Python/OpenSSL clients (a wildcard needs two labels "
        f"after it); add the names you use explicitly, e.g. api{name[1:]}"
        for name in shallow_wildcards(names)
    ]


def _wrote_p12(path: Path, password: str, *, default: bool) -> str:
    note = " (the default, like mkcert; choose one with --p12-password)" if default else ""
    return f"wrote {path}  (PKCS#12 with key and chain, password {password!r}{note})"


def _summary(cert: x509.Certificate, client: bool) -> str:
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    kind = "client, EKU clientAuth" if client else "server, EKU serverAuth"
    return f"{kind}; {', '.join(name_text(n) for n in sans)}; valid until {_until(cert)}"


# A client certificate's names are the client's, not a server's: the example URL is a server's.
SERVER_URL = "https://localhost:8443/"


def _usage(cert: x509.Certificate, pem_path: Path, key_path: Path, *, ca_pem: Path, client: bool) -> list[str]:
    if client:
        return [
            "use it (client certificate; put your server's URL in place of " + SERVER_URL + "):",
            f"  curl --cacert {_q(ca_pem)} --cert {_q(pem_path)} --key {_q(key_path)} {SERVER_URL}",
            f"  requests.get({SERVER_URL!r}, verify={str(ca_pem)!r}, cert=({str(pem_path)!r}, {str(key_path)!r}))",
        ]
    serve = (f"  tlsproxy serve --listen 127.0.0.1:8443 --upstream http://127.0.0.1:8080 "
             f"--cert {_q(pem_path)} --key {_q(key_path)}")
    host = _first_host(cert)
    if host is None:  # only names clients never match (see the note above): no URL to suggest
        return ["use it:", serve]
    return ["use it:", serve, f"  curl --cacert {_q(ca_pem)} https://{host}:8443/"]


def _first_host(cert: x509.Certificate) -> str | None:
    """A host a client can connect to and match against the certificate, if any."""
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    for name in sans:
        if isinstance(name, x509.DNSName):
            if shallow_wildcards([name.value]):
                continue  # *.localhost: OpenSSL clients match no host with it
            return "app" + name.value[1:] if name.value.startswith("*.") else name.value
        if isinstance(name, x509.IPAddress):
            return f"[{name.value}]" if name.value.version == 6 else str(name.value)
    return None


def _until(cert: x509.Certificate) -> str:
    return rfc3339(cert.not_valid_after_utc)


def _q(path: Path | str) -> str:
    return shlex.quote(str(path))


def _say(*lines: str) -> None:
    print("\n".join(lines))
    sys.stdout.flush()
