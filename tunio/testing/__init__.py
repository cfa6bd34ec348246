"""Fakes and builders that run without privileges, for tunio's tests and tools.

- `tunio.testing.packets`: real IPv4/IPv6 packets with real checksums, built and parsed.
- `tunio.testing.stackrig`: the C stack driven through socketpairs in place of TUN queues, with
  the caller acting as its worker.
- `tunio.testing.fakestack`: a fake stack on a ROUTER socket, to drive a real worker.
- `tunio.testing.proxyfakes`: in-process SOCKS5 and HTTP proxy servers on loopback.

The privileged lab (network namespaces, real servers) is not part of the package: it lives in
the source tree's `tools/lab`, beside the demo and the benchmarks that use it.
"""
