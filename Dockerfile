# codetainer: a hardened container in which Claude Code works on one repository.
#
# Build and start on Fly.io:  fly machine run . --dockerfile Dockerfile  (see docs/image.md)
# Under Docker the container needs CAP_NET_ADMIN (firewall) and CAP_SYS_ADMIN (mounts):
#   docker run --cap-add NET_ADMIN --cap-add SYS_ADMIN -e GH_PAT -e CLAUDE_CODE_OAUTH_TOKEN ...
#
# This file is checked, not built, in this repository's CI (no Docker engine there):
# hadolint, plus tests/unit/test_image.py, which holds it to the paths the daemon uses.

ARG DEBIAN_IMAGE=debian:bookworm-slim
ARG NODE_IMAGE=node:22-bookworm-slim

# ---------------------------------------------------------------------------------------
# tmux from source: bookworm's 3.3a lacks synchronized output (DEC mode 2026), which
# Claude Code's renderer uses to redraw without flicker.
FROM ${DEBIAN_IMAGE} AS tmux-build
ARG TMUX_VERSION=3.6a
ARG TMUX_SHA256=b6d8d9c76585db8ef5fa00d4931902fa4b8cbe8166f528f44fc403961a3f3759
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Unpinned on purpose: bookworm's point releases carry security fixes, and an exact
# Debian version pin stops building as soon as the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        bison build-essential ca-certificates curl libevent-dev libncurses-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
RUN curl -fsSL --proto '=https' --tlsv1.2 -o tmux.tar.gz \
        "https://github.com/tmux/tmux/releases/download/${TMUX_VERSION}/tmux-${TMUX_VERSION}.tar.gz" \
    && echo "${TMUX_SHA256}  tmux.tar.gz" | sha256sum --check --strict - \
    && tar -xzf tmux.tar.gz
WORKDIR /build/tmux-${TMUX_VERSION}
RUN ./configure --prefix=/usr/local \
    && make -j"$(nproc)" \
    && make install-strip DESTDIR=/out \
    && /out/usr/local/bin/tmux -V

# ---------------------------------------------------------------------------------------
# The agent chain's seccomp loader in C (boot/chain.py): static, so it needs nothing of
# the runtime image; installed beside the venv's interpreter, where the daemon looks.
FROM ${DEBIAN_IMAGE} AS seccomp-build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY daemon/native/codetainer-seccomp.c /build/
RUN cc -O2 -Wall -Wextra -Werror -static -o /build/codetainer-seccomp /build/codetainer-seccomp.c

# ---------------------------------------------------------------------------------------
# CoreDNS, the image's DNS filter, pinned by version and by the SHA-256 of each
# architecture's release tarball. Refresh all three together; a mismatch fails the build.
FROM ${DEBIAN_IMAGE} AS coredns-fetch
ARG COREDNS_VERSION=1.12.1
ARG COREDNS_SHA256_AMD64=886206d686363cd7d71c62ac47287692b954da3dfc9bcbffedd80d4b69358001
ARG COREDNS_SHA256_ARM64=f1c9030a7fbf3c9f5421894211b3bee62de7e77d260fc4282a0d8104376b6300
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /fetch
RUN arch="$(dpkg --print-architecture)" \
    && case "${arch}" in \
         amd64) sum="${COREDNS_SHA256_AMD64}" ;; \
         arm64) sum="${COREDNS_SHA256_ARM64}" ;; \
         *) echo "no pinned CoreDNS checksum for architecture ${arch}" >&2; exit 1 ;; \
       esac \
    && curl -fsSL --proto '=https' --tlsv1.2 -o coredns.tgz \
        "https://github.com/coredns/coredns/releases/download/v${COREDNS_VERSION}/coredns_${COREDNS_VERSION}_linux_${arch}.tgz" \
    && echo "${sum}  coredns.tgz" | sha256sum --check --strict - \
    && tar -xzf coredns.tgz coredns \
    && install -m 0755 coredns /usr/local/bin/coredns \
    && /usr/local/bin/coredns -version

# ---------------------------------------------------------------------------------------
# Node.js for the Claude Code CLI (it requires Node >= 22; bookworm ships 18).
FROM ${NODE_IMAGE} AS node

# ---------------------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE}
ARG CLAUDE_CODE_VERSION=2.1.330
# The agent's toolbox from npm, pinned like the CLI (the reference system's set; just and
# glow are left out: neither is in bookworm or on npm, and a cargo/go build is minutes).
ARG BUN_VERSION=1.4.5
ARG TYPESCRIPT_VERSION=7.0.2
ARG TYPESCRIPT_LANGUAGE_SERVER_VERSION=6.0.2
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV LANG=en_US.UTF-8 \
    LC_ALL=en_US.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates curl dnsmasq-base gh git iproute2 ipset iptables less \
        libevent-core-2.1-7 libncursesw6 locales nftables procps python3 python3-venv \
        bat bind9-dnsutils fd-find jq ripgrep tree unzip wget xxd \
    && ln -s /usr/bin/batcat /usr/local/bin/bat \
    && ln -s /usr/bin/fdfind /usr/local/bin/fd \
    && sed -i 's/^# *\(en_US.UTF-8 UTF-8\)/\1/' /etc/locale.gen \
    && locale-gen \
    && rm -rf /var/lib/apt/lists/*

COPY --from=tmux-build /out/usr/local/ /usr/local/
COPY --from=coredns-fetch /usr/local/bin/coredns /usr/local/bin/coredns
COPY --from=node /usr/local/bin/node /usr/local/bin/node
COPY --from=node /usr/local/lib/node_modules/npm /usr/local/lib/node_modules/npm

RUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm \
    && ln -s ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx \
    && npm install -g --no-fund --no-audit "@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION}" \
        "bun@${BUN_VERSION}" "typescript@${TYPESCRIPT_VERSION}" \
        "typescript-language-server@${TYPESCRIPT_LANGUAGE_SERVER_VERSION}" \
    && npm cache clean --force \
    && claude --version \
    && bun --version && tsc --version && typescript-language-server --version \
    && tmux -V

# The agent (uid 1000), the only user whose packets may reach upstream resolvers, and
# the policy proxy's (uid 998: the only one that reaches allowlisted hosts on 80/443 and
# reads the credentials; mitmproxy comes with the project's Python dependencies).
RUN useradd --create-home --uid 1000 --user-group --shell /bin/bash claude \
    && useradd --system --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin codetainer-dns \
    && useradd --system --uid 998 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin codetainer-proxy \
    && mkdir -p /workspace /run/codetainer \
    && chown claude:claude /workspace

# The project, in its own virtual environment; the console scripts go on PATH
# (`codetainer` is the sh front of codetainer-cli: attach's fast path).
COPY pyproject.toml README.md /opt/codetainer/
COPY daemon /opt/codetainer/daemon
RUN python3 -m venv /opt/codetainer/venv \
    && /opt/codetainer/venv/bin/pip install --no-cache-dir /opt/codetainer \
    && rm -rf /opt/codetainer/build \
    && for cmd in codetainerd codetainer codetainer-cli status attach-claude; do \
         ln -s "/opt/codetainer/venv/bin/${cmd}" "/usr/local/bin/${cmd}"; \
       done
COPY --from=seccomp-build /build/codetainer-seccomp /opt/codetainer/venv/bin/codetainer-seccomp

# Operator-edited configuration and the Claude Code hooks; the daemon reads these at boot
# and installs hooks/settings.template.json as /home/claude/.claude/settings.json.
COPY supervisord /opt/codetainer/supervisord
COPY network /opt/codetainer/network
COPY hooks /opt/codetainer/hooks
RUN chmod 0755 /opt/codetainer/hooks/session_namer.py /opt/codetainer/hooks/statusline.py

# `fly ssh console` lands in root's login shell, whose profile attaches to the agent.
COPY docker/root-profile.sh /root/.profile
# The single quotes are meant: the test runs when .bashrc is read, not now.
# hadolint ignore=SC2016
RUN echo '[ -n "${CODETAINER_PROFILE_SOURCED:-}" ] || . /root/.profile' >> /root/.bashrc

STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["codetainer", "status", "--check"]
ENTRYPOINT ["codetainerd"]
