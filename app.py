"""bdft dashboard: ``streamlit run app.py``. Navigation and the sidebar; each page is a thin file
in pages/ that lays out widgets and calls the bdft_core library."""
import streamlit as st

import ui

st.set_page_config(page_title="bdft: backdoor fine-tuning lab", page_icon=":material/shield:", layout="wide")

pages = [
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/attack_lab.py", title="Attack lab", icon=":material/bug_report:"),
    st.Page("pages/defense_lab.py", title="Defense lab", icon=":material/shield:"),
    st.Page("pages/explain.py", title="Explain", icon=":material/visibility:"),
    st.Page("pages/sequela.py", title="Sequela", icon=":material/radar:"),
    st.Page("pages/sweeps.py", title="Sweeps", icon=":material/grid_on:"),
    st.Page("pages/runs.py", title="Runs", icon=":material/table_chart:"),
]
page = st.navigation(pages)
ui.sidebar()
page.run()
