import time
from test_app import _app, _SEEN_JS, clip_dir, dash_duo, manifest, feature_index, clip_activations, clip_peaks, strong_feature  # noqa

def test_scratch(dash_duo, feature_index, strong_feature):
    dash_duo.start_server(_app(feature_index))
    dash_duo.wait_for_element("#search-set")
    dash_duo.driver.get(dash_duo.server_url + f"/search?index={strong_feature}&n=2")
    dash_duo.wait_for_element("#clip-graph-0 .js-plotly-plot", timeout=60)
    time.sleep(3)
    print(dash_duo.driver.execute_script("""var g=document.getElementById('clip-graph-0'); var gd=g.querySelector('.js-plotly-plot');
        var sc = gd.querySelector('.svg-container');
        return {wrap: g.getAttribute('style'), h: g.getBoundingClientRect().height, sc: sc.getAttribute('style'), layoutH: gd.layout.height, autosize: gd.layout.autosize, full: gd._fullLayout.height,
          zeroH: gd._context._hasZeroHeight, resp: gd._context.responsive}"""))
