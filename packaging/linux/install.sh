#!/bin/sh
# Install the unpacked Linux tarball: ./install.sh [PREFIX]   (default PREFIX: ~/.local; /usr/local needs root)
# Copies the one-folder bundle to PREFIX/lib/lora-studio, links PREFIX/bin/lora-studio to it, and installs the
# .desktop file, AppStream metainfo and icon so the app shows up in the menu and software centres.
# ./install.sh --uninstall [PREFIX] removes exactly those paths again.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
APP_ID=$(cat "$HERE/APP_ID")
EXE=$(cat "$HERE/APP_EXECUTABLE")

UNINSTALL=0
if [ "${1:-}" = "--uninstall" ]; then UNINSTALL=1; shift; fi
PREFIX=${1:-"$HOME/.local"}

LIB_DIR="$PREFIX/lib/$EXE"
BIN="$PREFIX/bin/$EXE"
DESKTOP="$PREFIX/share/applications/$APP_ID.desktop"
METAINFO="$PREFIX/share/metainfo/$APP_ID.metainfo.xml"
ICON="$PREFIX/share/icons/hicolor/scalable/apps/$APP_ID.svg"

refresh_caches() {
    # Only refresh an icon cache that already exists: creating one in a prefix nobody maintains would hide icons
    # installed there later. No update-desktop-database: it only indexes MimeType=, which the entry has none of.
    if [ -f "$PREFIX/share/icons/hicolor/icon-theme.cache" ] && command -v gtk-update-icon-cache >/dev/null 2>&1; then
        gtk-update-icon-cache -q "$PREFIX/share/icons/hicolor" || true
    fi
}

if [ "$UNINSTALL" = 1 ]; then
    rm -rf "$LIB_DIR"
    rm -f "$BIN" "$DESKTOP" "$METAINFO" "$ICON"
    refresh_caches
    echo "Removed $EXE from $PREFIX"
    exit 0
fi

mkdir -p "$PREFIX/lib" "$PREFIX/bin" "$(dirname "$DESKTOP")" "$(dirname "$METAINFO")" "$(dirname "$ICON")"
# Replace, never merge: files left over from an older version could shadow the new ones.
rm -rf "$LIB_DIR"
cp -R "$HERE/$EXE" "$LIB_DIR"
ln -sf "$LIB_DIR/$EXE" "$BIN"
# Absolute Exec=: PREFIX/bin is not on every desktop session's PATH (e.g. ~/.local/bin before first login).
sed -e "s|^Exec=.*|Exec=$BIN|" -e "s|^TryExec=.*|TryExec=$BIN|" "$HERE/share/applications/$APP_ID.desktop" > "$DESKTOP"
cp "$HERE/share/metainfo/$APP_ID.metainfo.xml" "$METAINFO"
cp "$HERE/share/icons/hicolor/scalable/apps/$APP_ID.svg" "$ICON"
refresh_caches
echo "Installed $EXE to $LIB_DIR; run it from the application menu or as $BIN"
