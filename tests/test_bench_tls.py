"""The pure parts of bench/'s mutual-TLS rows: certificates, s_time's summary, the ratios.

The bench itself (bench/run.py) is not run here: it times things, and CI times nothing.
Its modules import each other by bare name, as bench/run.py runs them, so bench/ goes on
the path.
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

from cryptography import x509

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from report import handshake_summary, mtls_ratios
from tls import make_bench_ca, mint_leaf, parse_s_time

from sidecar.identity.certs import load_certs

S_TIME_OUTPUT = """\
Collecting connection statistics for 2 seconds
*****************************

714 connections in 0.76s; 939.47 connections/user sec, bytes read 137088
714 connections in 3 real seconds, 192 bytes read per connection
"""


def test_s_time_summary_is_the_connection_count():
    assert parse_s_time(S_TIME_OUTPUT) == 714
    assert parse_s_time("ERROR\nconnect:errno=111\n") is None


def test_nginx_back_leaf_has_the_spiffe_uri_and_a_dns_name(tmp_path):
    ca_path = make_bench_ca(tmp_path, "nginx-tls.bench")
    cert_path, key_path = mint_leaf(ca_path, "nginx-back", tmp_path / "back", dns_name="back.example")
    ca = load_certs(ca_path.read_bytes())[0]
    cert = load_certs(cert_path.read_bytes())[0]
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://nginx-tls.bench/ns/default/dc/local/svc/nginx-back"
    ]
    assert san.get_values_for_type(x509.DNSName) == ["back.example"]
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(ca_path.with_suffix(".key").stat().st_mode) == 0o600


def test_client_leaf_without_dns_name_is_make_leaf_as_is(tmp_path):
    ca_path = make_bench_ca(tmp_path, "micro-sidecar.local")
    cert_path, _ = mint_leaf(ca_path, "bench-client", tmp_path / "client")
    cert = load_certs(cert_path.read_bytes())[0]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://micro-sidecar.local/ns/default/dc/local/svc/bench-client"
    ]
    assert san.value.get_values_for_type(x509.DNSName) == []


def test_mtls_cpu_ratio_is_judged_at_16_connections_only():
    med = {
        "small/mesh/16": {"cpu_us": 100.0},
        "small/mesh-mtls/16": {"cpu_us": 130.0},
        "small/nginx-tls/16": {"cpu_us": 65.0},
        "small/nginx-2hop/16": {"cpu_us": 50.0},
        "small/mesh/256": {"cpu_us": 100.0},
        "small/mesh-mtls/256": {"cpu_us": 110.0},
    }
    at16, at256 = mtls_ratios(med, [16, 256])
    assert at16["mesh_mtls_over_mesh"] == 1.3
    assert at16["verdict"] == "FAIL"
    assert at16["mesh_mtls_over_nginx_tls"] == 2.0
    assert at16["nginx_tls_over_nginx_2hop"] == 1.3
    assert at256["mesh_mtls_over_mesh"] == 1.1
    assert at256["verdict"] is None  # no target at 256
    assert at256["mesh_mtls_over_nginx_tls"] is None  # nginx-tls not measured there


def test_handshake_ratio_against_the_target():
    summary = handshake_summary(
        {"mesh-mtls": {"per_s": 120.0, "cpu_us": 3000.0}, "nginx-tls": {"per_s": 400.0, "cpu_us": 1500.0}}
    )
    assert summary["ratio"] == 0.3
    assert summary["verdict"] == "PASS"
    assert summary["cpu_bound_ratio"] == 0.5
    assert handshake_summary({"mesh-mtls": {"per_s": 100.0}})["verdict"] == "n/a"
