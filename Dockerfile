# telenode in a container: python slim, a virtual environment, a non-root user, data_dir as a volume.
# No DCMTK inside: the node speaks DICOM through pynetdicom; DCMTK is only the tests' peer.
# No GPL code inside: the optional `jpeg` extra (pylibjpeg-libjpeg, GPL-3.0) is not installed; build
# with --build-arg EXTRAS="[jpeg]" to add JPEG lossless / JPEG-LS decoding (README: Licences).
#
#   docker build -t telenode .
#   docker run -d --name telenode -p 11112:11112 -v telenode-data:/var/lib/telenode \
#     -v /etc/telenode/telenode.toml:/etc/telenode/telenode.toml:ro telenode

FROM python:3.12-slim-bookworm AS build
ARG EXTRAS=""
WORKDIR /src
COPY pyproject.toml README.md ./
COPY node ./node
RUN python -m venv /opt/telenode && /opt/telenode/bin/pip install --no-cache-dir ".${EXTRAS}"

FROM python:3.12-slim-bookworm
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/telenode --shell /usr/sbin/nologin telenode \
    && install -d -m 0700 -o telenode -g telenode /var/lib/telenode \
    && install -d -m 0755 /etc/telenode
COPY --from=build /opt/telenode /opt/telenode
COPY packaging/telenode.container.toml /etc/telenode/telenode.toml
ENV PATH="/opt/telenode/bin:${PATH}" \
    TELENODE_CONFIG=/etc/telenode/telenode.toml \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER telenode
WORKDIR /var/lib/telenode
VOLUME ["/var/lib/telenode"]
EXPOSE 11112
# The listener answers a C-ECHO (or refuses the check's AE title: it still answered).
HEALTHCHECK --interval=30s --timeout=15s --start-period=30s --retries=3 CMD ["telenode", "echo", "--timeout", "10"]
# SIGTERM: in-flight C-STOREs finish, then exit 0 (give `docker stop -t` more than stop_timeout).
STOPSIGNAL SIGTERM
ENTRYPOINT ["telenode"]
CMD ["serve"]
