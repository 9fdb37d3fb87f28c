# syntax=docker/dockerfile:1
# Eclipse Mosquitto with the production configuration of broker/: TLS on 8883 for everything that
# crosses a network, plaintext only on the container's loopback, no anonymous clients, the ACL of
# the four roles. Build from the repository root:
#
#   docker build -f docker/broker.Dockerfile -t ecg-broker:0.1.0 .
#
# The image holds no secret. broker/mosquitto.conf reads the password file and the certificates
# from /mosquitto/config/; here those names point into /run/secrets/ecg-broker/, where a volume
# provides passwd and certs/{ca.crt,server.crt,server.key}, readable by the `mosquitto` user
# (uid 1883), as docker/install-secrets.py writes them. (Mounting a whole directory over
# /mosquitto/config/, e.g. the DIR/broker/ of broker/run-dev, works too.)
# Pinned to the 2.0 series the test suite runs against (Debian's mosquitto 2.0).

FROM eclipse-mosquitto:2.0.22
LABEL org.opencontainers.image.title="ecg-broker" \
      org.opencontainers.image.description="Eclipse Mosquitto configured for the ECG edge: TLS, passwords, role ACL" \
      org.opencontainers.image.licenses="MIT"
COPY broker/mosquitto.conf /mosquitto/config/mosquitto.conf
# mosquitto reads the ACL as the `mosquitto` user and warns about files others can read.
COPY --chown=1883:1883 --chmod=0600 broker/acl /mosquitto/config/acl
RUN ln -s /run/secrets/ecg-broker/passwd /mosquitto/config/passwd \
    && ln -s /run/secrets/ecg-broker/certs /mosquitto/config/certs
# The image's entrypoint starts as root only to hand /mosquitto to the `mosquitto` user; mosquitto
# itself drops to that user before it reads the password file, the ACL and the certificates.
EXPOSE 8883
