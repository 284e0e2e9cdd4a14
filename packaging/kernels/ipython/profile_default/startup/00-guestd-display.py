"""Display formatters and image patches for Python kernels started by guestd.

Loaded by IPython at kernel start (IPYTHONDIR points at this profile through the
kernelspec that packaging/kernels/install.sh writes). Everything heavy is imported
lazily: pandas, matplotlib, PIL, orjson and e2b_charts are touched only when the user
has already imported the library in question, so an idle kernel stays small.

MIME types produced here and read by guestd's bridge:
  e2b/data         column-oriented table for pandas DataFrames (or _repr_e2b_data_)
  e2b/chart        chart description from e2b_charts for matplotlib figures
                   (or _repr_e2b_chart_), {} when nothing can be extracted
  application/json JSON for plain dicts and lists (numpy values, non-string keys)
"""


def _guestd_install_display():
    import importlib.abc
    import importlib.machinery
    import sys

    from IPython import get_ipython
    from IPython.core.formatters import BaseFormatter, JSONFormatter, catch_format_error
    from traitlets import ObjectName, Unicode

    shell = get_ipython()
    if shell is None:
        return

    # --- e2b/data: tables -------------------------------------------------------------
    def _dataframe_to_columns(df):
        import json

        # pandas' own JSON writer turns NaN into null and Timestamps into ISO-8601
        # strings; "split" keeps column order and duplicate-free positional access.
        split = json.loads(df.to_json(orient="split", date_format="iso", date_unit="us"))
        columns = [str(c) for c in split.get("columns", [])]
        rows = split.get("data", [])
        return {
            name: [row[i] for row in rows] for i, name in enumerate(columns)
        }

    # The library checks below go through sys.modules rather than the formatter's type
    # registry: they cost nothing until the user imports the library, and IPython's
    # matplotlib integration clears every formatter's registration for Figure whenever
    # it (re)configures the inline backend.
    class E2BDataFormatter(BaseFormatter):
        format_type = Unicode("e2b/data")
        print_method = ObjectName("_repr_e2b_data_")
        _return_type = (dict, list)

        @catch_format_error
        def __call__(self, obj):
            pandas = sys.modules.get("pandas")
            if self.enabled and pandas is not None and isinstance(obj, pandas.DataFrame):
                return _dataframe_to_columns(obj)
            return super().__call__(obj)

    data_formatter = E2BDataFormatter(parent=shell.display_formatter)

    # --- e2b/chart: matplotlib figures ------------------------------------------------
    def _figure_to_chart(fig):
        try:
            from e2b_charts import chart_figure_to_chart

            chart = chart_figure_to_chart(fig)
            if chart is None:
                return {}
            try:
                return chart.model_dump(mode="json")
            except Exception:  # noqa: BLE001 - numpy scalars (box plots of int data)
                import decimal

                import orjson

                def plain(o):
                    if isinstance(o, decimal.Decimal):
                        return float(o)
                    if hasattr(o, "item"):
                        return o.item()
                    return str(o)

                raw = orjson.dumps(
                    chart.model_dump(), option=orjson.OPT_SERIALIZE_NUMPY, default=plain
                )
                return orjson.loads(raw)
        except Exception:  # noqa: BLE001 - a chart must never break the display
            return {}

    class E2BChartFormatter(BaseFormatter):
        format_type = Unicode("e2b/chart")
        print_method = ObjectName("_repr_e2b_chart_")
        _return_type = (dict,)

        @catch_format_error
        def __call__(self, obj):
            figure = sys.modules.get("matplotlib.figure")
            if self.enabled and figure is not None and isinstance(obj, figure.Figure):
                return _figure_to_chart(obj)
            return super().__call__(obj)

    chart_formatter = E2BChartFormatter(parent=shell.display_formatter)

    # --- application/json: dicts and lists ---------------------------------------------
    class GuestdJSONFormatter(JSONFormatter):
        def __call__(self, obj):
            if type(obj) in (dict, list):
                try:
                    import orjson

                    raw = orjson.dumps(
                        obj,
                        option=orjson.OPT_SERIALIZE_NUMPY
                        | orjson.OPT_NON_STR_KEYS
                        | orjson.OPT_PASSTHROUGH_SUBCLASS,
                        default=str,
                    )
                    return orjson.loads(raw)
                except Exception:  # noqa: BLE001 - fall back to the standard path
                    pass
            return super().__call__(obj)

    formatters = shell.display_formatter.formatters
    json_formatter = GuestdJSONFormatter(parent=shell.display_formatter)
    old_json = formatters.get("application/json")
    if old_json is not None:
        # Keep anything registered on the standard formatter so far.
        json_formatter.type_printers.update(old_json.type_printers)
        json_formatter.deferred_printers.update(old_json.deferred_printers)
    formatters["application/json"] = json_formatter
    formatters["e2b/data"] = data_formatter
    formatters["e2b/chart"] = chart_formatter
    active = getattr(shell.display_formatter, "active_types", None)
    if isinstance(active, list):
        for mime in ("e2b/data", "e2b/chart", "application/json"):
            if mime not in active:
                active.append(mime)

    # --- Pillow: Image.show() and Image.save() display the image ------------------------
    def _patch_pillow():
        image_mod = sys.modules.get("PIL.Image")
        imageshow = sys.modules.get("PIL.ImageShow")
        if imageshow is not None and not getattr(imageshow, "_guestd_patched", False):
            imageshow._guestd_patched = True

            class _Silent:
                def show(self, image, **options):
                    return 0

            # External Unix viewers would try to open a window (or a browser); make them
            # report failure so show() falls through to the IPython viewer.
            for viewer in list(getattr(imageshow, "_viewers", [])):
                if not isinstance(viewer, getattr(imageshow, "IPythonViewer", ())):
                    viewer.show = _Silent().show
            ipython_viewer = getattr(imageshow, "IPythonViewer", None)
            if ipython_viewer is not None and not any(
                isinstance(v, ipython_viewer) for v in imageshow._viewers
            ):
                imageshow.register(ipython_viewer)
        if image_mod is not None and not getattr(image_mod, "_guestd_patched", False):
            image_mod._guestd_patched = True
            original_save = image_mod.Image.save

            def save(self, fp, *args, **kwargs):
                result = original_save(self, fp, *args, **kwargs)
                import os

                if isinstance(fp, (str, os.PathLike)):
                    try:
                        from IPython.display import display

                        display(self)
                    except Exception:  # noqa: BLE001 - saving succeeded; display is a bonus
                        pass
                return result

            save.__doc__ = original_save.__doc__
            image_mod.Image.save = save

    class _PillowHook(importlib.abc.MetaPathFinder):
        """Patches PIL.Image / PIL.ImageShow right after they are imported."""

        targets = ("PIL.Image", "PIL.ImageShow")

        def find_spec(self, fullname, path, target=None):
            if fullname not in self.targets:
                return None
            for finder in sys.meta_path:
                if finder is self:
                    continue
                find = getattr(finder, "find_spec", None)
                if find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is None or spec.loader is None:
                    continue
                loader = spec.loader
                exec_module = getattr(loader, "exec_module", None)
                if exec_module is None:
                    return spec

                def patched_exec(module, _orig=exec_module):
                    _orig(module)
                    try:
                        _patch_pillow()
                    except Exception:  # noqa: BLE001
                        pass

                class _Loader(importlib.abc.Loader):
                    def create_module(self, spec, _l=loader):
                        return _l.create_module(spec)

                    def exec_module(self, module):
                        patched_exec(module)

                spec.loader = _Loader()
                return spec
            return None

    if "PIL.Image" in sys.modules or "PIL.ImageShow" in sys.modules:
        _patch_pillow()
    sys.meta_path.insert(0, _PillowHook())


try:
    _guestd_install_display()
finally:
    del _guestd_install_display
