# The Cresset image: the self-contained CPU distribution (`make dist`) on a slim Debian, and
# nothing else: no Python, no build tools. Build it from the folder holding the tarball that
# `make dist` prints (and this file):
#
#   docker build --build-arg DIST=cresset-0.1.0-linux-x86_64-cpu -t cresset:0.1.0 .
#
# It runs as an unprivileged user (uid 1000) and needs no shell at run time; its entry point
# is `cresset`, so a pod's args start with `serve` (deploy/kserve/servingruntime.yaml).
FROM debian:bookworm-slim
ARG DIST=cresset-0.1.0-linux-x86_64-cpu
# ADD unpacks the tarball into /opt/$DIST.
ADD ${DIST}.tar.gz /opt/
RUN ln -s "/opt/${DIST}" /opt/cresset && mkdir -p /tmp/cresset && chown 1000:1000 /tmp/cresset
USER 1000:1000
WORKDIR /tmp
ENV CRESSET_WORK_DIR=/tmp/cresset
EXPOSE 8080 9000 8082
ENTRYPOINT ["/opt/cresset/bin/cresset"]
CMD ["serve", "--help"]
