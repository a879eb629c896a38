"""``tlsproxy check``: validate a config and the files it names, before ``serve`` does.

Exit 0 with a short summary and ``config OK``; exit 1 with one
``tlsproxy: error: FILE:LINE: key: reason`` line per problem on stderr. Warnings (a
certificate expiring within 14 days) are printed the same way and do not fail.
With ``--client-cert F --url URL`` it then runs the authorization dry run
(``proxy.check.dry_run``) and exits 0 when the certificate would be admitted, 1 if not.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from proxy.check.checks import CheckReport, check_files
from proxy.check.dry_run import explain_access, split_url
from proxy.config.load import default_config_path, load_config_with_lines
from proxy.config.model import ProxyConfig
from proxy.errors import UsageError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check",
        help="validate the config and its certificate files (exit 0/1)",
        description="Load the config, open every certificate, key, CA and CRL file it names, "
        "and report each problem as FILE:LINE: key: reason.",
    )
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        metavar="FILE",
        help="config file (default: $TLSPROXY_CONFIG, then ./config/proxy.yaml)",
    )
    dry_run_group = parser.add_argument_group(
        "authorization dry run", "which service a URL reaches and whether a client certificate is admitted"
    )
    dry_run_group.add_argument("--client-cert", type=Path, metavar="FILE", help="client certificate (PEM)")
    dry_run_group.add_argument("--url", metavar="URL", help="e.g. https://api.localhost/v1")
    parser.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    if (args.client_cert is None) != (args.url is None):
        raise UsageError("--client-cert and --url go together")
    if args.url is not None:
        split_url(args.url)  # a bad --url is a usage error, before any file is read
    path = args.config or default_config_path(os.environ)
    config, lines = load_config_with_lines(path)
    report = check_files(config, lines, str(path))
    print(summary(config, report))
    for finding in report.findings:
        print(f"tlsproxy: {finding.severity}: {finding.message}", file=sys.stderr)
    if not report.ok:
        return 1
    print("config OK")
    if args.client_cert is not None:
        return dry_run(config, args.client_cert, args.url)
    return 0


def summary(config: ProxyConfig, report: CheckReport) -> str:
    """A few lines a person reads to confirm the config says what they meant."""
    lines = [f"listen: {', '.join(map(str, config.listen))}"]
    if config.listen_plain:
        lines.append(f"listen_plain: {', '.join(map(str, config.listen_plain))} (plain HTTP)")
    if config.redirect_http is not None:
        lines.append(f"redirect_http: {config.redirect_http} -> https")
    if config.admin.listen is not None:
        lines.append(f"admin: {config.admin.listen}")
    lines.append(f"client_auth: {config.client_auth.mode}, forward {config.client_auth.forward}")
    lines.append("services:")
    for service in config.services:
        hosts = ",".join(service.hosts) or "*"
        upstreams = ", ".join(u.url for u in service.upstreams)
        client_auth = ""
        if service.client_auth is not None:
            client_auth = " [client cert required]" if service.client_auth.require else " [client cert checked]"
        if service.upstream_tls is not None and service.upstream_tls.cert is not None:
            client_auth += f" [presents {service.upstream_tls.cert.name} upstream]"
        lines.append(f"  {service.name}: {hosts}{service.path_prefix} -> {upstreams}{client_auth}")
    if report.certificates:
        lines.append("certificates:")
        for info in report.certificates:
            lines.append(
                f"  {info.file}: {', '.join(info.names) or '(no names)'} "
                f"(expires {info.not_after:%Y-%m-%d}, {info.days_left} days left)"
            )
    if config.tls.auto:
        lines.append(f"auto certificates: issued from the CA in {config.tls.ca_dir} (created if missing)")
    return "\n".join(lines)


def dry_run(config: ProxyConfig, client_cert_path: Path, url: str) -> int:
    """``check --client-cert F --url URL``: which service the URL reaches and whether the
    certificate would be admitted, and why (exit 0 admitted, 1 refused)."""
    verdict = explain_access(config, client_cert_path, url)
    print("\n".join(verdict.lines))
    return 0 if verdict.admitted else 1
