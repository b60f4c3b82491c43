"""The system Chromium both browser suites launch (tests/browser, tests/integration/test_webui_editor.py)."""
import os

# Debian's package (Playwright downloads no browser); CONSISTENT_STORY_CHROMIUM overrides it.
CHROMIUM = os.environ.get("CONSISTENT_STORY_CHROMIUM", "/usr/bin/chromium")
# Headless on a machine without network beyond package registries: no background connections Chromium would retry.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
