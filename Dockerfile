# The peer alone, as a static binary on an empty base: nothing to pull, nothing else inside.
# Build it with scripts/build-image (it compiles the static binary first, then this image).
FROM scratch
COPY target/x86_64-unknown-linux-musl/release/peer /peer
# Not root: any unprivileged uid works, the peer needs no file of its own.
USER 10001:10001
EXPOSE 4000
ENTRYPOINT ["/peer"]
