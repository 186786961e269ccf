# scer-proxy: slim Python base, non-root user. Its configuration is /etc/scer-proxy/config.toml (shipped
# from docker/config.toml; a file mounted there replaces it). No SCER_* variable is set here: one would
# override the mounted file.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY scer_proxy ./scer_proxy
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
COPY docker/config.toml /etc/scer-proxy/config.toml
RUN useradd --system --uid 10001 --home-dir /var/lib/scer-proxy --create-home scer
USER scer
WORKDIR /var/lib/scer-proxy
EXPOSE 8080
VOLUME ["/var/lib/scer-proxy"]
# Reads the same configuration as serve (no curl in the slim base); exit 0 while the proxy answers.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["scer-proxy", "health", "--config", "/etc/scer-proxy/config.toml"]
# The configuration is in the entrypoint, so flags given to `docker run` add to it rather than drop it.
ENTRYPOINT ["scer-proxy", "serve", "--config", "/etc/scer-proxy/config.toml"]
CMD []
