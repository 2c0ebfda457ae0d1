"""Installation script for mailguard."""

from setuptools import find_packages, setup

setup(
    name="mailguard",
    version="0.1.0",
    description="A small-office mail host on Twisted that can never be an open relay",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    python_requires=">=3.11",
    packages=find_packages(include=["mailguard", "mailguard.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/mailguard_plugin.py"]},
    install_requires=[
        "twisted[tls]>=24.7",
        "zope.interface",
        "libpass>=1.9",
        "argon2-cffi",
        "dkimpy>=1.1",      # DKIM verification (RFC 6376, RFC 8463); signing is mailguard's own
        "pynacl",           # dkimpy's Ed25519 verification
        "publicsuffixlist",  # DMARC's organisational domain (RFC 7489 section 3.2)
        "ldaptor>=21.2",
        "prometheus-client>=0.17",  # [metrics]: /metrics in the Prometheus text format
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-twisted",
            "trustme",          # throw-away CAs for the TLS verification tests
            "hypothesis",
            "mypy",
            "mypy-zope",
            "pyyaml",           # the RFC 7208 SPF test suite is YAML
        ],
    },
    entry_points={"console_scripts": ["mailguard = mailguard.app.cli:main"]},
)
