# The fusebox proxy as a container image: `docker build -t fusebox .`, or `docker compose up`
# for the whole fleet (docker-compose.yml).
#
# Two stages: a Rust builder that compiles the dependencies in a layer of their own (rebuilt
# only when Cargo.toml or Cargo.lock change), and a small runtime image (distroless: glibc,
# CA certificates, no shell) that runs `fusebox serve` as a non-root user.

# The toolchain the project is built and tested with (Cargo.toml's rust-version is the
# library's minimum; the binary's dependencies are checked with this one).
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS builder
WORKDIR /build

# 1. Dependencies only: stubs for the crate's targets (deploy/stub-targets.sh), built once so
#    that this layer holds every compiled dependency of the binary.
COPY Cargo.toml Cargo.lock ./
COPY deploy/stub-targets.sh /usr/local/bin/stub-targets
RUN sh /usr/local/bin/stub-targets \
    && cargo build --release --locked --bin fusebox \
    && rm -rf src target/release/fusebox target/release/deps/fusebox-* \
              target/release/deps/libfusebox-* target/release/.fingerprint/fusebox-*

# 2. The crate itself (the stubs of tests and benches stay: the manifest names them). The
#    crate's fingerprints went with the stubs, so cargo rebuilds it whatever the files' times.
COPY README.md ./
COPY lua lua
COPY src src
RUN cargo build --release --locked --bin fusebox \
    && install -m 0755 target/release/fusebox /usr/local/bin/fusebox \
    && /usr/local/bin/fusebox --version

# The runtime: glibc and CA certificates (for https:// upstreams and rediss://), no shell,
# user `nonroot` (uid 65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /usr/local/bin/fusebox /usr/local/bin/fusebox
COPY deploy/fusebox.toml /etc/fusebox/fusebox.toml
USER nonroot:nonroot
ENV FUSEBOX_CONFIG=/etc/fusebox/fusebox.toml \
    FUSEBOX_LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/fusebox"]
CMD ["serve"]
